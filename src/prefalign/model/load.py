"""Load every kind of model the commands use, and save the result: the tokenizer, the policy to train (full
weights, LoRA, continued LoRA, QLoRA), a one-output sequence-classification model (reward and value models), and a
model or LoRA adapter for inference (eval, chat). Every failure is a one-line PrefalignError naming the flag.

Adapter names when continuing from `--peft_adapter_path` (TRL's pattern from its Mistral-7B DPO post: the SFT
adapter loaded twice into one base model):
- `POLICY_ADAPTER` ("default"): trainable, the one that is saved. It keeps peft's default name so that a
  saved output directory is a plain adapter directory.
- `REFERENCE_ADAPTER` ("reference"): the same weights, frozen; `model.reference` switches to it for the
  reference pass.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.processing_utils import ProcessorMixin

from prefalign.config import LoadArgs, ModelArgs, ModelSource
from prefalign.errors import PrefalignError
from prefalign.model.checks import (
    LOAD_ERRORS as _LOAD_ERRORS,
)
from prefalign.model.checks import (
    architectures,
    check_adapter_base,
    check_lora_targets,
    check_vocab,
    require_causal_lm,
)
from prefalign.model.gguf import find_gguf, load_gguf, load_gguf_model
from prefalign.model.processor import load_processor as auto_processor
from prefalign.model.quant import after_4bit_load, bnb_kwargs, check_4bit_possible, dequantized_base, is_4bit
from prefalign.model.weights import full_state_dict, is_main_process

POLICY_ADAPTER = "default"
REFERENCE_ADAPTER = "reference"
DTYPES: dict[str, Any] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def load_tokenizer(args: ModelSource) -> PreTrainedTokenizerBase:
    """The tokenizer of `--tokenizer_name_or_path` (default: the model's); see `load_processing`."""
    return load_processing(args)[0]


def load_processing(args: ModelSource) -> tuple[PreTrainedTokenizerBase, ProcessorMixin | None]:
    """(tokenizer, processor) of `--tokenizer_name_or_path` (default: the model's). The processor is the
    vision-language model's `AutoProcessor` (its tokenizer is the one returned) and None for a text model; the
    tokenizer's pad falls back to eos, and it carries the processor's chat template."""
    name = args.tokenizer_name_or_path or args.model_name_or_path
    flag = "--tokenizer_name_or_path" if args.tokenizer_name_or_path else "--model_name_or_path"
    if not name:
        raise PrefalignError("no model given; pass a local directory or a hub id", "--model_name_or_path")
    gguf_path = find_gguf(name, flag)
    if gguf_path is not None:  # a GGUF file holds a text model's tokenizer and chat template, never a processor
        tokenizer, processor = load_gguf(AutoTokenizer, gguf_path, flag, trust_remote_code=args.trust_remote_code), None
    else:
        tokenizer, processor = _load_tokenizer_or_processor(name, flag, args.trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PrefalignError(f"tokenizer {name!r} has neither a pad nor an eos token", flag)
        # Padding positions are always masked out, so reusing eos as pad changes no loss.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, processor


def _load_tokenizer_or_processor(name: str, flag: str, trust_remote_code: bool) -> tuple[Any, Any]:
    """(tokenizer, processor) from a Hugging Face directory or hub id: a VLM's processor and its tokenizer, or a
    text model's tokenizer and None."""
    if _looks_local(name) and not Path(name).expanduser().is_dir():
        raise PrefalignError(f"no such tokenizer directory: {name}", flag)
    processor, vision = None, is_vision_language(name, trust_remote_code)
    try:
        if vision:
            processor = auto_processor(name, trust_remote_code=trust_remote_code)
            tokenizer = processor.tokenizer
            if processor.chat_template and not getattr(tokenizer, "chat_template", None):
                tokenizer.chat_template = processor.chat_template
        else:
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except _LOAD_ERRORS as e:
        what = "a processor" if processor is None and vision else "a tokenizer"
        raise PrefalignError(f"cannot load {what} from {name!r}: {_first_line(e)}", flag) from None
    return tokenizer, processor


def is_vision_language(name: str | None, trust_remote_code: bool = False) -> bool:
    """Whether the model at `name` is a vision-language model (its config has a vision part)."""
    if not name:
        return False
    return _has_vision_config(str(name), trust_remote_code)


def _has_vision_config(name: str, trust_remote_code: bool) -> bool:
    directory = Path(name).expanduser()
    if (directory / "config.json").is_file():
        try:
            return "vision_config" in json.loads((directory / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
    if (directory / "processor_config.json").is_file():  # an adapter directory saved with its processor
        return True
    if _looks_local(name):
        return False
    try:
        return getattr(AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code), "vision_config", None) is not None
    except _LOAD_ERRORS:
        return False  # the model loader reports the real problem


def load_pretrained(name_or_path: str | None, args: LoadArgs, flag: str, quantize: bool = False, *,
                    auto_class: Any = None, what: str = "a causal LM", **extra: Any) -> Any:
    """A causal LM (or `what`, loaded by `auto_class` with `extra` from_pretrained arguments) from a local directory,
    hub id or GGUF checkpoint, with the dtype and attention settings of `args` (4-bit with `quantize`); any failure is
    a PrefalignError naming `flag`. A model read from GGUF says so in its `dequantized_from` attribute."""
    if not name_or_path:
        raise PrefalignError("no model given; pass a local directory or a hub id", flag)
    if quantize:
        check_4bit_possible(args)
    gguf_path = find_gguf(name_or_path, flag)
    if gguf_path is None and _looks_local(name_or_path) and not Path(name_or_path).expanduser().is_dir():
        raise PrefalignError(f"no such model directory ({name_or_path} does not exist)", flag)
    if args.dtype not in DTYPES:
        raise PrefalignError(f"unknown dtype {args.dtype!r}; choose one of {sorted(DTYPES)}", "--dtype")
    kwargs: dict[str, Any] = {"dtype": DTYPES[args.dtype], "trust_remote_code": args.trust_remote_code}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    if auto_class is None and is_vision_language(name_or_path, args.trust_remote_code):
        auto_class, what = AutoModelForImageTextToText, "a vision-language model"
    elif auto_class is None and gguf_path is None:  # a GGUF file always holds a causal LM
        require_causal_lm(name_or_path, args, flag)
    auto_class = auto_class or AutoModelForCausalLM
    if gguf_path is not None:
        return load_gguf_model(gguf_path, args, flag, quantize, auto_class, **kwargs, **extra)
    if quantize:
        kwargs.update(bnb_kwargs(args))
    try:
        loaded = auto_class.from_pretrained(name_or_path, **kwargs, **extra)
    except _LOAD_ERRORS as e:
        raise PrefalignError(f"cannot load {what} from {name_or_path!r}: {_first_line(e)}", flag) from None
    if quantize:
        after_4bit_load(loaded[0] if isinstance(loaded, tuple) else loaded)
    return loaded


@contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around every `get_peft_model` / `PeftModel.from_pretrained`. peft 0.21.2 (the latest release) reads the
    model's `is_gradient_checkpointing` in `PeftModel.__init__`, a property transformers 5 has deprecated in favour
    of `is_activation_checkpointing` and warns about (FutureWarning) on every read, so every LoRA run printed it.
    Our code reads neither (load_policy enables input gradients for checkpointing itself); this silences that one
    deprecation, by its message, for the duration of the wrap, and nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
def load_policy(args: ModelArgs, gradient_checkpointing: bool = False) -> PreTrainedModel | PeftModel:
    """The model to train: full weights, a fresh LoRA (`use_peft`), a continued adapter, or QLoRA (a fresh or
    continued adapter on a 4-bit base)."""
    model = load_pretrained(args.model_name_or_path, args, "--model_name_or_path", quantize=args.load_in_4bit)
    model.config.use_cache = False  # training never decodes; the KV cache only costs memory
    model = prepare_base(model, quantized=args.load_in_4bit, gradient_checkpointing=gradient_checkpointing)

    vision = vision_tower(model)
    if vision is not None and args.freeze_vision_tower:
        vision.requires_grad_(False)  # full fine-tuning trains the language model (and projector) only
    if args.peft_adapter_path:
        model = _load_adapter_twice(model, args.peft_adapter_path, args)
    elif args.use_peft or args.load_in_4bit:
        check_lora_targets(model, args.lora_target_modules)
        with peft_wrapping():
            model = get_peft_model(model, lora_config(args, model))
    if isinstance(model, PeftModel) and gradient_checkpointing:
        # With a frozen base the embedding output does not require grad; checkpointed blocks then would
        # not propagate gradients to the adapters without this.
        model.enable_input_require_grads()
    return model


def prepare_base(model: PreTrainedModel, *, quantized: bool, gradient_checkpointing: bool) -> PreTrainedModel:
    """A loaded base before its adapter: a 4-bit one frozen, with the weights that stay unquantized (norms,
    embeddings, a score head) cast to fp32 and checkpointing enabled the way 4-bit bases need it; otherwise only
    the checkpointing asked for."""
    if quantized:
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    if gradient_checkpointing:
        enable_checkpointing(model)
    return model


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Activation checkpointing with the non-reentrant torch checkpoint (works with frozen inputs and peft)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def vision_tower(model: nn.Module) -> nn.Module | None:
    """The vision encoder of a vision-language model (Qwen2-VL's `visual`, LLaVA's `vision_tower`, ...), else None."""
    if getattr(getattr(model, "config", None), "vision_config", None) is None:
        return None
    encoder = model.get_encoder(modality="image")
    return None if encoder is model or encoder is getattr(model, "base_model", None) else encoder


def lora_config(args: ModelArgs, model: nn.Module | None = None) -> LoraConfig:
    """LoRA settings from the flags; "all-linear" adapts every linear layer except the output head. On a
    vision-language model with --freeze_vision_tower (the default) the adapters go into the language model only:
    peft's "all-linear" and plain names such as q_proj would also match the vision tower's layers."""
    targets: str | list[str] = args.lora_target_modules or "all-linear"
    if model is not None and vision_tower(model) is not None and args.freeze_vision_tower:
        targets = _language_model_targets(model, args.lora_target_modules)
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )


def _language_model_targets(model: nn.Module, names: list[str] | None) -> str:
    """A regex (saved verbatim in adapter_config.json) matching the linear layers of the language model only,
    restricted to the leaf `names` when given."""
    decoder = model.get_decoder()
    prefix = next(n for n, m in model.named_modules() if m is decoder)
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in decoder.named_modules() if isinstance(m, nn.Linear)})
    if names:
        leaves = [n for n in leaves if n in set(names)]
        if not leaves:
            raise PrefalignError(f"none of {', '.join(names)} is a linear layer of the language model",
                                 "--lora_target_modules")
    return rf"{re.escape(prefix)}\..*\.({'|'.join(map(re.escape, leaves))})"


def _load_adapter_twice(model: PreTrainedModel, path: str, args: ModelArgs) -> PeftModel:
    """The adapter at `path` as the trainable policy adapter and again, frozen, as the reference adapter; the saved
    adapter names the base it was really loaded on."""
    if _looks_local(path) and not Path(path).expanduser().is_dir():
        raise PrefalignError(f"no such adapter directory: {path}", "--peft_adapter_path")
    check_adapter_base(args)
    try:
        with peft_wrapping():
            peft_model = PeftModel.from_pretrained(model, path, is_trainable=True, adapter_name=POLICY_ADAPTER)
        peft_model.load_adapter(path, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    except _LOAD_ERRORS as e:
        raise PrefalignError(f"cannot load a LoRA adapter from {path!r}: {_first_line(e)}", "--peft_adapter_path") from None
    peft_model.set_adapter(POLICY_ADAPTER)  # also makes only the policy adapter trainable
    for config in peft_model.peft_config.values():  # peft would write the adapter's old base into the output
        config.base_model_name_or_path = args.model_name_or_path
    return peft_model


def save_model(
    model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path, merge_adapter: bool
) -> None:
    """Full model: safetensors weights + tokenizer. Peft: the policy adapter (never the reference adapter)
    + tokenizer, and with `merge_adapter` also full merged weights in out_dir/merged.

    Under FSDP every process calls this (the shards are gathered) and rank 0 writes."""
    state = full_state_dict(model)  # None unless sharded
    if not is_main_process():
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not isinstance(model, PeftModel):
        model.save_pretrained(out, state_dict=state)
        tokenizer.save_pretrained(out)
        return
    model.save_pretrained(out, selected_adapters=[POLICY_ADAPTER], state_dict=state)
    tokenizer.save_pretrained(out)
    if merge_adapter and is_4bit(model):
        # Merging into 4-bit weights would requantize them and round most of the adapter away (measured: the merged
        # model moved 2.1% where the adapter moved 3.5%); merge into the dequantized weights instead.
        merged = PeftModel.from_pretrained(dequantized_base(model), str(out)).merge_and_unload()
        merged.save_pretrained(out / "merged")
        tokenizer.save_pretrained(out / "merged")
        print("--merge_adapter: merged/ holds the adapter merged into a float32 copy of the 4-bit base, dequantized "
              "(the weights training saw), not into the 4-bit weights")
    elif merge_adapter:  # never sharded here: train_and_save refuses --merge_adapter under FSDP before training
        # Merge into a copy: merge_and_unload rewrites the modules in place and the caller may keep training.
        merged_source = copy.deepcopy(model)
        for name in list(merged_source.peft_config):
            if name != POLICY_ADAPTER:
                merged_source.delete_adapter(name)
        merged = merged_source.merge_and_unload()
        merged.save_pretrained(out / "merged")
        tokenizer.save_pretrained(out / "merged")


def load_score_model(name_or_path: str | None, flag: str, args: LoadArgs | None = None, *,
                     with_info: bool = False, quantize: bool = False) -> Any:
    """A one-output sequence-classification model (a reward or value model): the decoder's hidden state at the last
    non-pad token through a linear `score` head. With `with_info`, (model, transformers' loading info), whose
    missing keys say whether the head was created fresh. With `quantize` the body is 4-bit (`args` carries the
    QuantArgs); the head stays full precision, so that it can be trained in full."""
    model, info = load_pretrained(name_or_path, args or LoadArgs(), flag, quantize=quantize,
                                  auto_class=AutoModelForSequenceClassification, what="a sequence-classification model",
                                  num_labels=1, output_loading_info=True)
    if not hasattr(model, "score"):
        raise PrefalignError(f"{type(model).__name__} has no `score` head (not a decoder classifier)", flag)
    return (model, info) if with_info else model


def has_new_head(info: dict[str, Any]) -> bool:
    """Whether transformers created the `score` head fresh (the checkpoint had none), from its loading info."""
    return any(k.split(".")[0] == "score" or ".score." in k for k in info.get("missing_keys", []))


def load_trained_score_model(name_or_path: str | None, flag: str) -> Any:
    """A reward model that must already be trained: a checkpoint without a score head (a causal LM) is refused,
    naming its architecture, instead of scoring with a randomly initialised head."""
    model, info = load_score_model(name_or_path, flag, with_info=True)
    if has_new_head(info):
        names = architectures(str(name_or_path))
        what = names[0] if names else type(model).__name__
        raise PrefalignError(f"{name_or_path} is a {what} checkpoint without a trained score head; a reward model "
                             "must be a sequence-classification model (e.g. the output of `prefalign rm`)", flag)
    return model


def load_model_for_inference(path: str | None, base_model: str | None = None,
                             tokenizer_path: str | None = None, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode: a full model, or a base model with the LoRA adapter at `path` applied (its base
    is `base_model`, default the one adapter_config.json records)."""
    model, tokenizer, _ = load_for_inference(path, base_model, tokenizer_path, trust_remote_code)
    return model, tokenizer


def load_for_inference(path: str | None, base_model: str | None = None, tokenizer_path: str | None = None,
                       trust_remote_code: bool = False) -> tuple[Any, Any, ProcessorMixin | None]:
    """(model, tokenizer, processor) as `load_model_for_inference` loads them; the processor of a vision-language
    model (None for a text model)."""
    load = LoadArgs(trust_remote_code=trust_remote_code)
    if not path:
        raise PrefalignError("is required", "--model_name_or_path")
    p = Path(path).expanduser()
    is_adapter = (p / "adapter_config.json").is_file()
    base = None
    if is_adapter:
        base = base_model or _recorded_base(p)
        model = load_pretrained(base, load, "--base_model_name_or_path")
        try:
            with peft_wrapping():
                model = PeftModel.from_pretrained(model, str(p))
        except _LOAD_ERRORS as e:
            raise PrefalignError(f"cannot load a LoRA adapter: {_first_line(e)}", f"--model_name_or_path {path}") from None
    else:
        model = load_pretrained(path, load, "--model_name_or_path")
    # the adapter directory usually holds the tokenizer too; fall back to the base model's
    tok_source = tokenizer_path or (path if (p / "tokenizer_config.json").is_file() or not is_adapter else base)
    tokenizer, processor = load_processing(ModelSource(model_name_or_path=tok_source, trust_remote_code=trust_remote_code))
    check_vocab(model, tokenizer, "--tokenizer_name_or_path" if tokenizer_path else "--model_name_or_path")
    return model.eval(), tokenizer, processor


def _recorded_base(adapter_dir: Path) -> str:
    recorded = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not recorded:
        raise PrefalignError("the adapter names no base model; pass --base_model_name_or_path", str(adapter_dir))
    return recorded


def _looks_local(name: str) -> bool:
    """A path rather than a hub id ("org/name"): absolute, relative with dots, or more than one slash."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
