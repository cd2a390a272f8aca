"""The reference model of DPO-style losses, in whichever form costs the least memory.

`build_reference` picks, in this order:
- `--ref_model_name_or_path`: that model, loaded once and frozen;
- `--peft_adapter_path`: the frozen "reference" adapter that `model.load` put into the policy's own base model
  (the policy trains the "default" copy of the same adapter);
- `--use_peft` / QLoRA with a fresh adapter: the policy itself with its adapter disabled (no second copy);
- otherwise: a frozen deep copy of the initial policy (no second disk load).
Reference-free losses (SimPO, ORPO, CPO, ...) get None and nothing is loaded.

Every reference pass runs under `torch.no_grad()` in eval mode (no dropout: the reference must be a fixed
function). When the pass uses the policy's own weights, the policy's per-module train/eval flags, its active
adapter and every parameter's `requires_grad` are restored afterwards: peft's `set_adapter` would otherwise
leave the policy adapter frozen. Gradient checkpointing needs no special handling: transformers only
checkpoints in train mode.

`ReferenceSync` is TR-DPO: every few optimizer steps the frozen reference model moves towards the policy,
θ_ref ← (1 − α)·θ_ref + α·θ_policy, and checkpoints keep the moved reference so that a resumed run continues it.

`precompute_reference` runs the reference once over the data and caches per-pair token log-probs on disk
(safetensors) under a fingerprint of model + data + tokenization, so the reference can be dropped for training.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from prefalign.config import PolicyArgs
from prefalign.data.types import TokenizedPair
from prefalign.errors import PrefalignError
from prefalign.model.load import REFERENCE_ADAPTER, load_pretrained
from prefalign.model.logprobs import CompletionLogps, completion_logps
from prefalign.model.weights import full_state_dict, is_main_process, load_weights_into


class Reference:
    """Computes reference log-probs of a batch; subclasses say which weights the pass uses."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @contextmanager
    def weights(self) -> Iterator[None]:
        """Select this reference's weights in `self.model` for the duration of a pass (restored afterwards).

        Callers that need their own options for the pass (the RL trainers take log-probs at a sampling
        temperature) run `self.model` inside this context, under no_grad and eval mode as `logps` does.
        """
        yield

    def logps(self, batch: dict[str, Any]) -> CompletionLogps:
        """Reference CompletionLogps of `batch` (no grad, eval mode)."""
        with torch.no_grad(), eval_mode(self.model), self.weights():
            return completion_logps(self.model, batch)


class FrozenModelReference(Reference):
    """A separate model (deep copy of the initial policy, or --ref_model_name_or_path), frozen for good."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model.eval().requires_grad_(False))


class DisabledAdapterReference(Reference):
    """The policy's base weights: its LoRA adapter switched off for the pass."""

    @contextmanager
    def weights(self) -> Iterator[None]:
        with self.model.disable_adapter():
            yield


class AdapterReference(Reference):
    """A frozen adapter living in the policy's base model next to the trainable one."""

    def __init__(self, model: PeftModel, adapter_name: str = REFERENCE_ADAPTER) -> None:
        super().__init__(model)
        self.adapter_name = adapter_name

    @contextmanager
    def weights(self) -> Iterator[None]:
        previous = self.model.active_adapter
        requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.set_adapter(self.adapter_name, inference_mode=True)
        try:
            yield
        finally:
            self.model.set_adapter(previous)
            # set_adapter flips requires_grad of every adapter; put back exactly what the trainer had.
            for p, flag in requires_grad:
                p.requires_grad_(flag)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the pass; restore each module's own flag afterwards (they need not all agree)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """No grad and eval mode for a pass; every module's own train flag is restored afterwards."""
    with torch.no_grad(), eval_mode(model):
        yield


def build_reference(policy: nn.Module, model_args: PolicyArgs, loss_needs_reference: bool) -> Reference | None:
    """The cheapest reference that is right for this configuration (see the module docstring). Precomputed
    reference log-probs are a separate step (precompute_reference)."""
    if not loss_needs_reference:
        return None
    # The reference pass needs no gradient sync, so it may use the model inside a DDP/DeepSpeed wrapper.
    policy = extract_model_from_parallel(policy)
    if model_args.ref_model_name_or_path:
        ref = load_pretrained(model_args.ref_model_name_or_path, model_args, "--ref_model_name_or_path")
        device = next(policy.parameters()).device
        return FrozenModelReference(ref.to(device))
    if isinstance(policy, PeftModel):
        if REFERENCE_ADAPTER in policy.peft_config:
            return AdapterReference(policy, REFERENCE_ADAPTER)
        return DisabledAdapterReference(policy)
    return FrozenModelReference(copy.deepcopy(policy))


# ---------------------------------------------------------------- TR-DPO: moving the reference


def mix_into_reference(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """θ_ref ← (1 − α)·θ_ref + α·θ_policy for every parameter, in place and without autograd (buffers untouched)."""
    with torch.no_grad():
        for ref_param, param in zip(reference.parameters(), policy.parameters(), strict=True):
            ref_param.lerp_(param.to(ref_param.dtype), alpha)


class ReferenceSync:
    """Moves a separate reference model towards the policy after every `every`-th optimizer step (TR-DPO,
    TRL's SyncRefModelCallback: the first update after step `every`, from the weights that step produced)."""

    def __init__(self, reference: Reference, policy: nn.Module, alpha: float, every: int) -> None:
        if not isinstance(reference, FrozenModelReference):
            raise PrefalignError("needs a separate reference model to move", "--sync_ref_model")
        policy = extract_model_from_parallel(policy)
        ref_shapes = [tuple(p.shape) for p in reference.model.parameters()]
        if ref_shapes != [tuple(p.shape) for p in policy.parameters()]:
            raise PrefalignError("the reference's parameters do not match the policy's one to one, so it cannot be "
                                 "mixed with it (--sync_ref_model)", "--ref_model_name_or_path")
        self.model, self.policy, self.alpha, self.every = reference.model, policy, alpha, every

    def after_step(self, global_step: int) -> None:
        if global_step % self.every == 0:
            mix_into_reference(self.model, self.policy, self.alpha)

    def save(self, directory: Path) -> None:
        """The moved reference in `directory/reference` (Hugging Face format). Every process calls this (sharded weights
        are gathered); the main process writes."""
        state = full_state_dict(self.model)  # None unless sharded
        if is_main_process():
            self.model.save_pretrained(Path(directory) / "reference", state_dict=state)

    def load(self, directory: Path) -> None:
        load_weights_into(self.model, Path(directory) / "reference")


# ---------------------------------------------------------------- precomputed reference log-probs

CachedPair = tuple[Tensor, Tensor]  # (chosen_token_logps [Lc], rejected_token_logps [Lr]), float32 on CPU


def reference_sources(model_args: PolicyArgs) -> list[str]:
    """What determines the reference's weights: the model (and continued adapter) it is built from, and dtype."""
    if model_args.ref_model_name_or_path:
        sources = [model_args.ref_model_name_or_path]
    else:
        sources = [model_args.model_name_or_path or ""]
        if model_args.peft_adapter_path:
            sources.append(model_args.peft_adapter_path)
    return [*sources, f"dtype={model_args.dtype}", f"4bit={model_args.load_in_4bit}"]


def fingerprint(
    model_sources: Sequence[str], pairs: Sequence[TokenizedPair], settings: Mapping[str, Any] | None = None
) -> str:
    """A hex key for a reference cache: model identity + token ids of every pair + tokenization settings.

    A local directory is identified by the name, size and mtime of every file in it (retrained weights change
    the key); a hub id by its name. The token ids already reflect template and truncation; `settings` should
    still carry them (and anything else that changes the numbers, e.g. precision) to be explicit.
    """
    h = hashlib.sha256()
    for source in model_sources:
        h.update(_source_identity(source).encode())
    h.update(json.dumps(dict(settings or {}), sort_keys=True, default=str).encode())
    for pair in pairs:
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            h.update(array("q", [len(ids), *ids]).tobytes())  # the length prefix keeps the split unambiguous
        for image in pair.images:  # equal image tokens, other pixels: the pixels' hash tells them apart
            h.update(image.digest)
    return h.hexdigest()[:32]


def _source_identity(source: str) -> str:
    path = Path(source).expanduser()
    if not path.exists():
        return source
    if path.is_file():
        stat = path.stat()
        return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    files = sorted(p for p in path.rglob("*") if p.is_file())
    parts = [f"{p.relative_to(path)}|{p.stat().st_size}|{p.stat().st_mtime_ns}" for p in files]
    return f"{path.resolve()}|" + ";".join(parts)


def precompute_reference(
    reference: Reference,
    pairs: list[TokenizedPair],
    collate_fn: Callable[[list[TokenizedPair]], dict[str, Any]],
    batch_size: int,
    cache_dir: Path,
    fingerprint: str,
) -> list[CachedPair]:
    """Per-pair reference token log-probs, read from `cache_dir` when this fingerprint was computed before."""
    path = Path(cache_dir) / f"ref_logps-{fingerprint}.safetensors"
    if path.exists():
        entries = _read_cache(path)
        if _matches(entries, pairs):
            return entries
    entries = []
    device = next(reference.model.parameters()).device
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        out = reference.logps(to_device(collate_fn(chunk), device))
        logps, mask = out.token_logps.float().cpu(), out.mask.cpu()  # one transfer per batch, not two per pair
        b = len(chunk)
        for i in range(b):
            entries.append((logps[i][mask[i]], logps[b + i][mask[b + i]]))
    _write_cache(path, entries, fingerprint)
    return entries


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """`batch` with its tensors (and those of nested dicts, e.g. a VLM batch's vision_inputs) on `device`."""
    return {k: v.to(device) if isinstance(v, Tensor) else to_device(v, device) if isinstance(v, dict) else v
            for k, v in batch.items()}


def cached_logps(entries: Sequence[CachedPair], device: torch.device | str | None = None) -> CompletionLogps:
    """Cached entries of one batch's pairs (in batch order) as the CompletionLogps a live reference returns.

    Only token log-probs are cached: `logits_mean_sum` is NaN (no loss uses the reference's logits) and
    `wpo_adjust` is None.
    """
    rows = [c for c, _ in entries] + [r for _, r in entries]  # chosen rows first, then rejected
    width = max((len(r) for r in rows), default=0)
    token_logps = torch.zeros(len(rows), width, dtype=torch.float32)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        token_logps[i, : len(row)] = row
        mask[i, : len(row)] = True
    nan = torch.full((len(rows),), float("nan"))
    return CompletionLogps(token_logps.to(device), mask.to(device), nan.to(device), None)


def _matches(entries: list[CachedPair], pairs: list[TokenizedPair]) -> bool:
    """A cache file is only reused if every pair's completion lengths agree (guards a stale or foreign file)."""
    return len(entries) == len(pairs) and all(
        len(c) == len(p.chosen_ids) and len(r) == len(p.rejected_ids) for (c, r), p in zip(entries, pairs)
    )


def _write_cache(path: Path, entries: list[CachedPair], key: str) -> None:
    tensors = {
        "chosen": torch.cat([c for c, _ in entries]) if entries else torch.zeros(0),
        "chosen_lengths": torch.tensor([len(c) for c, _ in entries], dtype=torch.long),
        "rejected": torch.cat([r for _, r in entries]) if entries else torch.zeros(0),
        "rejected_lengths": torch.tensor([len(r) for _, r in entries], dtype=torch.long),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"fingerprint": key})
    os.replace(tmp, path)  # complete or absent: a crash mid-write leaves no half-file under the real name


def _read_cache(path: Path) -> list[CachedPair]:
    t = load_file(str(path))
    chosen = torch.split(t["chosen"], t["chosen_lengths"].tolist())
    rejected = torch.split(t["rejected"], t["rejected_lengths"].tolist())
    return list(zip(chosen, rejected))


def precompute_sequence_logps(
    reference: Reference,
    items: Sequence[Any],
    collate_fn: Callable[[Sequence[Any]], dict[str, Any]],
    batch_size: int,
    cache_dir: Path,
    fingerprint: str,
) -> Tensor:
    """Reference log-probs summed over the completion of each of `items` (one completion each, batched by
    `collate_fn`), in order, float32 on CPU; read from `cache_dir` when this fingerprint was computed before
    (unpaired stages need no per-token values)."""
    path = Path(cache_dir) / f"seq_logps-{fingerprint}.safetensors"
    if path.exists():
        cached = load_file(str(path))["logps"]
        if len(cached) == len(items):
            return cached
    parts = [reference.logps(collate_fn(items[start:start + batch_size])).token_logps.float().sum(-1).cpu()
             for start in range(0, len(items), batch_size)]
    logps = torch.cat(parts) if parts else torch.zeros(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"logps": logps.contiguous()}, str(tmp), metadata={"fingerprint": fingerprint})
    os.replace(tmp, path)  # complete or absent
    return logps
