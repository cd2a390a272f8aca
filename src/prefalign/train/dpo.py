"""DPO and its variants on the shared loop.

A step: completion log-probs of the policy (with grad) and of the reference (no grad, or from the on-disk cache),
aggregated per pair, then the registered loss(es). Metrics carry TRL's names and meanings: rewards are
beta · (policy − reference) sequence log-probs, accuracy counts chosen reward strictly above rejected, logps are
sums of completion-token log-probs (means with --length_normalize).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from prefalign.config import DPOConfig
from prefalign.data.collate import collate_padded
from prefalign.data.packing import collate_packed, pack_pairs
from prefalign.data.types import TokenizedPair
from prefalign.losses.aggregate import preference_inputs
from prefalign.losses.preference import compute_preference_loss, needs_reference, resolve_losses
from prefalign.model.logprobs import CompletionLogps, completion_logps
from prefalign.model.packed import supports_packing  # importing it registers the "packed" layout
from prefalign.train.loop import sequential_groups, shuffled_groups
from prefalign.train.metrics import MetricSums
from prefalign.train.run import disable_dropout, print_summary


def use_packing(cfg: DPOConfig, models: list[Any]) -> tuple[bool, str | None]:
    """Whether the padding-free (and, with share_prompt, shared-prompt) layout runs; else a one-line notice."""
    if not cfg.padding_free:
        return False, None  # asked for padded rows (share_prompt only exists in the packed layout)
    for model in models:
        ok, reason = supports_packing(model)
        if not ok:
            return False, f"padding-free batches are not supported here ({reason}); using padded batches"
    return True, None


class DPOStage:
    """Preference optimisation step for the loop (see train.loop.Stage)."""

    example_unit = "pairs"
    progress_keys = {"loss": "loss", "rewards/margins": "margin", "rewards/accuracies": "acc"}

    def __init__(self, cfg: DPOConfig, train: list[TokenizedPair], eval_: list[TokenizedPair] | None,
                 pad_token_id: int, reference: Any = None, ref_cache: dict[str, Any] | None = None,
                 packed: bool = False) -> None:
        self.cfg = cfg
        self.packed = packed  # padding-free layout (shared prompt with cfg.share_prompt); else padded rows
        self.data = {"train": train, "eval": eval_ or []}
        self.pad_token_id = pad_token_id
        self.reference = reference
        self.ref_cache = ref_cache or {}  # split -> cached reference log-probs (precompute_ref_log_probs)
        self.uses_reference = needs_reference([name for name, _ in resolve_losses(cfg)])

    # ---------------------------------------------------------------- data
    def train_groups(self, epoch: int) -> list[list[int]]:
        groups = shuffled_groups(len(self.data["train"]), self.cfg.per_device_train_batch_size, self.cfg.seed, epoch)
        if not (self.packed and self.cfg.max_tokens_per_batch):
            return groups  # same pairs per micro-batch whatever the layout: the fast path changes no update
        # Token-budget packing: the shuffled order is kept, a pair is never split across micro-batches.
        order = [i for g in groups for i in g]
        pairs = [self.data["train"][i] for i in order]
        packs = pack_pairs(pairs, max_tokens_per_batch=self.cfg.max_tokens_per_batch, share_prompt=self.cfg.share_prompt)
        return [[order[j] for j in pack] for pack in packs]

    def eval_groups(self) -> list[list[int]]:
        return sequential_groups(len(self.data["eval"]), self.cfg.per_device_eval_batch_size)

    def batch_weight(self, group: Sequence[int], split: str) -> float:
        return float(len(group))

    def make_batch(self, group: Sequence[int], split: str) -> dict[str, Any]:
        pairs = [self.data[split][i] for i in group]
        if self.packed:
            batch = collate_packed(pairs, self.pad_token_id, share_prompt=self.cfg.share_prompt)
        else:
            batch = collate_padded(pairs, self.pad_token_id)
        batch["num_tokens"] = sum(p.num_tokens for p in pairs)  # unique tokens: the prompt counted once
        batch["indices"] = list(group)
        batch["split"] = split
        return batch

    # ---------------------------------------------------------------- math
    def _reference_logps(self, batch: dict[str, Any]) -> CompletionLogps | None:
        if not self.uses_reference:
            return None
        cache = self.ref_cache.get(batch["split"])
        if cache is not None:
            return cache.lookup(batch["indices"], device=batch["input_ids"].device)
        with torch.no_grad():
            return self.reference.logps(batch)

    def _forward(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, MetricSums]:
        policy = completion_logps(model, batch, with_wpo=self.cfg.use_weighting)
        ref = self._reference_logps(batch)
        inputs = preference_inputs(policy, ref, self.cfg)
        out = compute_preference_loss(inputs, self.cfg)
        b = batch["num_pairs"]
        tokens = policy.mask.sum(-1).float()  # (2B,)
        chosen_r, rejected_r = out.chosen_rewards.detach(), out.rejected_rewards.detach()
        sums = torch.stack([  # one host transfer for every metric of the micro-batch, not one sync each
            out.losses.detach().sum(), chosen_r.sum(), rejected_r.sum(), (chosen_r - rejected_r).sum(),
            (chosen_r > rejected_r).float().sum(), inputs.chosen_logps.detach().sum(),
            inputs.rejected_logps.detach().sum(), policy.logits_mean_sum[:b].sum(), tokens[:b].sum(),
            policy.logits_mean_sum[b:].sum(), tokens[b:].sum(),
        ]).float().tolist()
        names = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected")
        metrics: MetricSums = {name: (value, b) for name, value in zip(names, sums)}
        metrics["logits/chosen"] = (sums[7], sums[8])  # mean over completion tokens, as TRL
        metrics["logits/rejected"] = (sums[9], sums[10])
        return out.losses.sum(), metrics

    def step(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, MetricSums]:
        return self._forward(model, batch)

    def eval_step(self, model: torch.nn.Module, batch: dict[str, Any]) -> MetricSums:
        return self._forward(model, batch)[1]


def default_cache_dir() -> Path:
    """Reference log-prob caches live outside any run directory so that later runs with the same key reuse them."""
    root = os.environ.get("PREFALIGN_CACHE_DIR") or Path.home() / ".cache" / "prefalign"
    return Path(root) / "ref_logps"


def check_dpo_config(cfg: DPOConfig) -> None:
    """Everything that can be checked without loading a model or data."""
    from prefalign.data.tokenize import check_args
    from prefalign.train.run import check_train_args, require

    require(cfg, "model_name_or_path", "dataset_name")
    check_args(cfg)  # truncation settings
    resolve_losses(cfg)  # unknown names, weight count, option ranges, beta
    check_train_args(cfg)


def train_dpo(cfg: DPOConfig) -> Any:
    """Run DPO end to end: data → model → reference → loop → final model in cfg.output_dir."""
    from prefalign.data.templates import resolve_chat_template
    from prefalign.data.tokenize import load_tokenized_pairs
    from prefalign.model.load import load_policy, load_tokenizer
    from prefalign.model.reference import build_reference
    from prefalign.train.run import make_accelerator, train_and_save

    check_dpo_config(cfg)
    accelerator = make_accelerator(cfg)
    tokenizer = load_tokenizer(cfg)
    resolve_chat_template(tokenizer, cfg.chat_template)
    train, eval_ = load_tokenized_pairs(cfg, tokenizer, accelerator.print)
    model = load_policy(cfg, gradient_checkpointing=cfg.gradient_checkpointing).to(accelerator.device)
    if cfg.disable_dropout:
        disable_dropout(model)
    uses_reference = needs_reference([name for name, _ in resolve_losses(cfg)])
    reference = build_reference(model, cfg, uses_reference)
    ref_cache = None
    if cfg.precompute_ref_log_probs and reference is not None:
        ref_cache = _precompute(cfg, reference, train, eval_, tokenizer)
        reference = None  # every step reads the cache: no reference forward, and a frozen copy can be freed
    packed, notice = use_packing(cfg, [model] + ([reference.model] if reference is not None else []))
    if notice:
        accelerator.print(notice)
    stage = DPOStage(cfg, train, eval_, tokenizer.pad_token_id, reference, ref_cache, packed=packed)

    return train_and_save(stage, model, tokenizer, cfg, accelerator, "dpo")


class ReferenceCache:
    """Precomputed reference log-probs of one split, looked up by pair index."""

    def __init__(self, entries: list[Any]) -> None:
        self.entries = entries

    def lookup(self, indices: Sequence[int], device: Any) -> CompletionLogps:
        from prefalign.model.reference import cached_logps

        return cached_logps([self.entries[i] for i in indices], device=device)


def _precompute(cfg: DPOConfig, reference: Any, train: list[TokenizedPair], eval_: list[TokenizedPair] | None,
                tokenizer: Any) -> dict[str, ReferenceCache]:
    """One reference pass before training, cached on disk under a fingerprint of model, data and settings."""
    from prefalign.model.reference import fingerprint, precompute_reference, reference_sources

    settings = {k: getattr(cfg, k) for k in ("max_length", "max_prompt_length", "max_completion_length",
                                             "truncation_mode", "chat_template", "bf16", "fp16")}
    caches = {}
    for split, pairs in (("train", train), ("eval", eval_ or [])):
        if pairs:
            entries = precompute_reference(
                reference, pairs, lambda ps: collate_padded(ps, tokenizer.pad_token_id),
                cfg.per_device_eval_batch_size, default_cache_dir(), fingerprint(reference_sources(cfg), pairs, settings),
            )
            caches[split] = ReferenceCache(entries)
    return caches


CONFIG = DPOConfig


def run_command(cfg: DPOConfig) -> None:
    """`prefalign dpo`."""
    print_summary("dpo", train_dpo(cfg), cfg.output_dir, ("loss", "rewards/accuracies", "rewards/margins",
                                                         "eval_rewards/accuracies"))
