"""4-bit (QLoRA) base models with bitsandbytes, on a CUDA GPU or on the CPU (bitsandbytes >= 0.49 has CPU kernels).

- `bnb_kwargs`: the from_pretrained arguments of a 4-bit load. Compute runs in float32 on CPU and in bfloat16 on a
  GPU that has it (else float16), as QLoRA does.
- `after_4bit_load`: `no_cpu_repacking` and `release_checkpoint_map` (below), after every 4-bit load.
- `no_cpu_repacking`: on CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights in place and for good
  on its first no-grad forward in eval mode (a reference pass, a generation); from then on every matmul, in training
  too, runs a kernel without a backward and the adapters get wrong gradients (measured: cosine 0.06 to the right
  ones, a layer's lora_A gradient exactly 0) with only a warning. We switch the repacking off on every layer, so
  eval and train forwards are one code path and agree bitwise.
- `dequantized_base`: a float32 copy of a 4-bit base, for `--merge_adapter` (merging into the 4-bit weights would
  requantize them and round most of the adapter away).
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from transformers import BitsAndBytesConfig, PreTrainedModel

from prefalign.errors import PrefalignError

EXTRA = "pip install 'prefalign[qlora]'"


def check_4bit_possible(args: Any) -> None:
    """QLoRA needs bitsandbytes (>= 0.49 without a GPU): say so before spending minutes loading weights."""
    try:
        import bitsandbytes  # optional extra (prefalign[qlora]), imported here only to check it
    except ImportError:
        raise PrefalignError(f"4-bit loading needs bitsandbytes: {EXTRA}", "--load_in_4bit") from None
    version = tuple(int(x) for x in re.findall(r"\d+", bitsandbytes.__version__)[:2])
    if not torch.cuda.is_available() and version < (0, 49):
        raise PrefalignError(f"4-bit loading without a GPU needs bitsandbytes >= 0.49 (installed: "
                             f"{bitsandbytes.__version__}): {EXTRA}", "--load_in_4bit")


def bnb_kwargs(args: Any) -> dict[str, Any]:
    """from_pretrained arguments of a 4-bit load: the quantization, and on a GPU the device to quantize on."""
    on_gpu = torch.cuda.is_available()
    compute = torch.float32  # CPU kernels: bf16 would round every activation and gains no speed there
    if on_gpu:
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=args.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=compute,
    )
    # On a GPU the weights are quantized where they will live (Accelerate has set this process's device).
    return {"quantization_config": config, **({"device_map": {"": torch.cuda.current_device()}} if on_gpu else {})}


def after_4bit_load(model: torch.nn.Module) -> None:
    """What every 4-bit load needs before use: no CPU repacking, and the checkpoint's memory map released."""
    no_cpu_repacking(model)
    release_checkpoint_map(model)


def no_cpu_repacking(model: torch.nn.Module) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for its CPU inference kernel (see the module docstring)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes.nn.Linear4bit (0.49, 0.50)
            module.support_avx512bf16_for_cpu = False


@torch.no_grad()
def release_checkpoint_map(model: torch.nn.Module) -> None:
    """Copy the tensors a 4-bit load did not quantize (embeddings, norms, a head) into the process's own memory.
    transformers leaves them as views of the memory-mapped safetensors file, and quantizing the other weights read
    every page of that file: the map then stays, with those pages resident, as long as one view lives (measured on
    SmolLM2-135M: 405 MB of its 538 MB file resident after the load, RSS 892 MB -> 595 MB once copied; after a GGUF
    load the file is a deleted temporary one). A float32 load keeps its views: their pages are read as used."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cpu" and getattr(tensor, "quant_state", None) is None:
            tensor.data = tensor.data.clone()


def is_4bit(model: torch.nn.Module) -> bool:
    """Whether any weight of `model` is a bitsandbytes 4-bit parameter."""
    return any(getattr(p, "quant_state", None) is not None for p in model.parameters())


def dequantized_base(model: Any) -> PreTrainedModel:
    """A float32 copy of a 4-bit peft model's base model without its adapters: every 4-bit weight dequantized to the
    values the forward pass computes with, every other weight copied."""
    import bitsandbytes.functional as bnb_functional  # optional extra; only a 4-bit model gets here

    base = model.get_base_model()
    config = copy.deepcopy(base.config)
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    dequantized: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        weight = getattr(module, "weight", None)
        if weight is not None and getattr(weight, "quant_state", None) is not None:
            dequantized[_plain_name(name) + ".weight"] = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    kept = {_plain_name(n): p for n, p in [*base.named_parameters(), *base.named_buffers()]
            if "lora_" not in n and ".modules_to_save." not in n}
    dense = type(base)(config).float()
    state, missing = {}, []
    for key in dense.state_dict():  # what a plain model holds (not the 4-bit quantization constants)
        value = dequantized.get(key, kept.get(key))
        if value is None:
            missing.append(key)
        else:
            state[key] = value.detach().float().cpu() if value.is_floating_point() else value.detach().cpu()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if [k for k in missing if not (tied and k == "lm_head.weight")]:
        raise ValueError(f"dequantized state does not match {type(base).__name__}: missing {missing[:3]}")
    dense.load_state_dict(state, strict=False)
    if tied:
        dense.tie_weights()
    return dense.eval()


def _plain_name(name: str) -> str:
    """A parameter name inside a peft-wrapped model as the plain model names it."""
    return name.replace(".base_layer", "").replace(".original_module", "")
