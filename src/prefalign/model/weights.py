"""Load weights saved in Hugging Face format back into a live model (used to resume from a checkpoint)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from prefalign.errors import PrefalignError


def _read_safetensors(directory: Path, single: str, index: str) -> dict[str, torch.Tensor]:
    if (directory / single).is_file():
        return load_file(directory / single)
    if (directory / index).is_file():
        shards = sorted(set(json.loads((directory / index).read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(directory / shard))
        return state
    raise PrefalignError(f"no {single} or {index} found", str(directory))


def load_weights_into(model: torch.nn.Module, directory: str | Path, adapter_name: str = "default") -> None:
    """Copy saved weights into `model` in place: a peft adapter, or a full model's state dict."""
    directory = Path(directory)
    if hasattr(model, "peft_config"):
        state = _read_safetensors(directory, "adapter_model.safetensors", "adapter_model.safetensors.index.json")
        result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise PrefalignError(f"adapter weights do not fit the model ({unexpected[0]})", str(directory))
        return
    state = _read_safetensors(directory, "model.safetensors", "model.safetensors.index.json")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])  # a list, or a dict keyed by the tied names
    really_missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if really_missing or unexpected:
        raise PrefalignError(f"weights do not fit the model ({(really_missing or unexpected)[0]})", str(directory))
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def is_main_process() -> bool:
    """Rank 0 of a launched group, or the only process. The launcher's RANK answers when no process group is up
    (before Accelerate starts one, or after `end_training` has torn it down)."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full weights of a sharded (FSDP or DeepSpeed ZeRO-3) `module` on CPU in the main process (empty tensors
    elsewhere); None when nothing is sharded, so callers keep their usual save path. Every process must call this
    together: gathering a shard is a collective."""
    state = module.state_dict(keep_vars=True)
    if not any(isinstance(v, DTensor) or is_zero3_partitioned(v) for v in state.values()):
        return None
    # Every process walks the same keys in the same order, so the collectives pair up. A tensor under two names
    # (tied embeddings) is gathered once, so the saved file keeps them tied, as save_pretrained expects.
    main = is_main_process()
    gathered: dict[int, torch.Tensor] = {}
    for value in state.values():
        if id(value) not in gathered:
            # only the main process writes: the others hold one gathered tensor at a time
            gathered[id(value)] = _gather_one(value, main)
    return {k: gathered[id(v)] for k, v in state.items()}


def is_zero3_partitioned(value: torch.Tensor) -> bool:
    """A parameter that DeepSpeed ZeRO-3 split over the processes (it carries DeepSpeed's `ds_id`)."""
    return hasattr(value, "ds_id")


def _gather_one(value: torch.Tensor, main: bool) -> torch.Tensor:
    """The full value of one (possibly sharded) tensor, on CPU in the main process; every process calls this."""
    if is_zero3_partitioned(value):
        import deepspeed  # present whenever a parameter is ZeRO-3 partitioned (the optional extra)

        with deepspeed.zero.GatheredParameters([value], modifier_rank=None):
            return value.detach().cpu().clone() if main else value.new_empty(0)
    full = value.full_tensor() if isinstance(value, DTensor) else value
    return full.detach().cpu() if main else full.new_empty(0)
