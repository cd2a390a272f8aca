"""DPO and its variants on the shared loop.

A step: completion log-probs of the policy (with grad) and of the reference (no grad, or from the on-disk cache),
aggregated per pair, then the registered loss(es). Metrics carry TRL's names and meanings: rewards are
beta · (policy − reference) sequence log-probs, accuracy counts chosen reward strictly above rejected, logps are
sums of completion-token log-probs (means with --length_normalize).

`preference_objective` is the seam between flags and math: it validates the loss settings once, naming the flag at
fault, and hands the losses a resolved `Objective`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from prefalign.config import DPOConfig, PreferenceLossArgs
from prefalign.config.checks import check_ref_sync, check_train_args, require
from prefalign.data.collate import collate_padded, padded_row_images
from prefalign.data.packing import collate_packed, pack_pairs, packed_row_images
from prefalign.data.tokenize import Truncation, load_tokenized_pairs, tokenize_pairs
from prefalign.data.types import Pair, TokenizedPair
from prefalign.data.vision import image_inputs
from prefalign.errors import PrefalignError
from prefalign.losses.aggregate import preference_inputs
from prefalign.losses.preference import (
    F_DIVERGENCES,
    LOSS_TRAITS,
    LOSSES,
    LossParams,
    Objective,
    compute_preference_loss,
    needs_reference,
)
from prefalign.model.load import save_model
from prefalign.model.logprobs import CompletionLogps, completion_logps
from prefalign.model.packed import supports_packing  # importing it registers the "packed" layout
from prefalign.model.reference import (
    DisabledAdapterReference,
    FrozenModelReference,
    Reference,
    ReferenceSync,
    build_reference,
    cached_logps,
    fingerprint,
    precompute_reference,
    reference_sources,
)
from prefalign.model.weights import load_weights_into
from prefalign.train.loop import LoopResult, accumulate_eval, sequential_groups, shuffled_groups
from prefalign.train.metrics import MetricSums
from prefalign.train.runinfo import RunFacts, SplitCount, describe_reference
from prefalign.train.setup import open_session, train_and_save, trainable_policy

# ---------------------------------------------------------------- the seam: flags -> Objective


def preference_objective(cfg: PreferenceLossArgs) -> Objective:
    """The loss settings of `cfg`, checked once; PrefalignError names the bad flag."""
    names = list(cfg.loss_type)
    valid = ", ".join(LOSSES)
    if not names:
        raise PrefalignError(f"give at least one loss; valid losses: {valid}", "--loss_type")
    unknown = [n for n in names if n not in LOSSES]
    if unknown:
        raise PrefalignError(f"unknown loss {', '.join(map(repr, unknown))}; valid losses: {valid}", "--loss_type")
    weights = [1.0] * len(names) if cfg.loss_weights is None else list(cfg.loss_weights)
    if len(weights) != len(names):
        raise PrefalignError(f"{len(weights)} weights given for {len(names)} losses ({', '.join(names)}); give one "
                             "weight per --loss_type", "--loss_weights")
    if cfg.beta <= 0:
        raise PrefalignError(f"beta must be positive, got {cfg.beta}", "--beta")
    _check_loss_options(names, cfg)
    params = LossParams(beta=cfg.beta, label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
                        cpo_alpha=cfg.cpo_alpha, discopop_tau=cfg.discopop_tau, f_divergence_type=cfg.f_divergence_type,
                        f_alpha_divergence_coef=cfg.f_alpha_divergence_coef, length_normalize=cfg.length_normalize)
    return Objective(tuple(zip(names, weights)), params, rpo_alpha=cfg.rpo_alpha, use_weighting=cfg.use_weighting,
                     ld_alpha=cfg.ld_alpha, dpop_lambda=cfg.dpop_lambda)


def _check_loss_options(names: list[str], cfg: PreferenceLossArgs) -> None:
    if cfg.f_divergence_type not in F_DIVERGENCES:
        raise PrefalignError(f"unknown divergence {cfg.f_divergence_type!r}; valid: {', '.join(F_DIVERGENCES)}",
                             "--f_divergence_type")
    no_f = [n for n in names if not LOSS_TRAITS[n].f_divergence]
    if cfg.f_divergence_type != "reverse_kl" and no_f:
        ok = ", ".join(n for n, t in LOSS_TRAITS.items() if t.f_divergence)
        raise PrefalignError(f"{cfg.f_divergence_type} is not defined for {', '.join(no_f)}; it applies to the "
                             f"losses built on the reward difference: {ok}", "--f_divergence_type")
    if "exo_pair" in names and not 0.0 < cfg.label_smoothing < 1.0:
        raise PrefalignError("exo_pair needs 0 < label_smoothing < 1 (the EXO paper uses 1e-3)", "--label_smoothing")
    if "robust" in names and not 0.0 <= cfg.label_smoothing < 0.5:
        raise PrefalignError("robust needs 0 <= label_smoothing < 0.5 (a flip probability)", "--label_smoothing")
    sorting = [n for n in names if LOSS_TRAITS[n].sorts_batch]
    if cfg.use_weighting and sorting:
        raise PrefalignError(f"WPO weights are per pair but {', '.join(sorting)} sorts pairs across the batch",
                             "--use_weighting")
    if cfg.ld_alpha is not None and not 0.0 <= cfg.ld_alpha <= 1.0:
        raise PrefalignError(f"ld_alpha must lie in [0, 1], got {cfg.ld_alpha}", "--ld_alpha")
    if cfg.dpop_lambda is not None:
        if cfg.dpop_lambda < 0:
            raise PrefalignError(f"must not be negative, got {cfg.dpop_lambda}", "--dpop_lambda")
        if not needs_reference(names):
            raise PrefalignError(f"DPOP penalises the chosen log-ratio to the reference, which {', '.join(names)} "
                                 "never reads", "--dpop_lambda")


def resolve_dpo_config(cfg: DPOConfig) -> tuple[Objective, Truncation]:
    """Everything that can be checked without loading a model or data, resolved once."""
    require(cfg, "model_name_or_path", "dataset_name")
    limits = Truncation.of(cfg)
    objective = preference_objective(cfg)
    check_ref_sync(cfg)
    if cfg.sync_ref_model and not objective.needs_reference:
        raise PrefalignError(f"{', '.join(cfg.loss_type)} use no reference model, so there is none to move",
                             "--sync_ref_model")
    check_train_args(cfg)
    return objective, limits


# ---------------------------------------------------------------- the stage


def use_packing(cfg: DPOConfig, models: list[Any]) -> tuple[bool, str]:
    """Whether the padding-free (and, with share_prompt, shared-prompt) layout runs, and the layout in words for the
    start-of-run block (with the reason when it fell back to padded rows)."""
    if not cfg.padding_free:
        return False, "padded (--padding_free false)"  # share_prompt only exists in the packed layout
    for model in models:
        ok, reason = supports_packing(model)
        if not ok:
            return False, f"padded: padding-free batches are not supported here ({reason})"
    shared = getattr(cfg, "share_prompt", False)  # KTO has no such flag: its KL rows always share
    return True, "packed (padding-free), shared prompt" if shared else "packed (padding-free)"


def collate_pairs(pairs: list[TokenizedPair], pad_token_id: int, *, packed: bool = False, share_prompt: bool = True,
                  processor: Any = None) -> dict[str, Any]:
    """One micro-batch of `pairs` in the padded or packed layout; pairs with images also get the model's image
    inputs (`vision_inputs`), every image in the order its tokens appear in the rows."""
    if packed:
        batch = collate_packed(pairs, pad_token_id, share_prompt=share_prompt)
        images = packed_row_images(pairs, share_prompt)
    else:
        batch = collate_padded(pairs, pad_token_id)
        images = padded_row_images(pairs)
    if images:
        batch["vision_inputs"] = image_inputs(processor, images, batch["input_ids"])
    return batch


class ReferenceCache:
    """Precomputed reference log-probs of one split, looked up by pair index."""

    def __init__(self, entries: list[Any]) -> None:
        self.entries = entries

    def lookup(self, indices: Sequence[int], device: Any) -> CompletionLogps:
        return cached_logps([self.entries[i] for i in indices], device=device)


class DPOStage:
    """Preference optimisation step for the loop (see train.loop.Stage)."""

    example_unit = "pairs"
    progress_keys = {"loss": "loss", "rewards/margins": "margin", "rewards/accuracies": "acc"}

    def __init__(self, cfg: DPOConfig, objective: Objective, train: list[TokenizedPair],
                 eval_: list[TokenizedPair] | None, pad_token_id: int, reference: Reference | None = None,
                 ref_cache: dict[str, ReferenceCache] | None = None, packed: bool = False,
                 ref_sync: ReferenceSync | None = None, processor: Any = None) -> None:
        self.cfg, self.objective = cfg, objective
        self.ref_sync = ref_sync  # TR-DPO: the reference moves towards the policy after some optimizer steps
        self.processor = processor  # a vision-language model's: image pairs' pixels are made per batch
        self.packed = packed  # padding-free layout (shared prompt with cfg.share_prompt); else padded rows
        self.data = {"train": train, "eval": eval_ or []}
        self.pad_token_id = pad_token_id
        self.reference = reference
        self.ref_cache = ref_cache or {}  # split -> cached reference log-probs (precompute_ref_log_probs)

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
        batch = collate_pairs(pairs, self.pad_token_id, packed=self.packed, share_prompt=self.cfg.share_prompt,
                              processor=self.processor)
        batch["num_tokens"] = sum(p.num_tokens for p in pairs)  # unique tokens: the prompt counted once
        batch["indices"] = list(group)
        batch["split"] = split
        return batch

    # ---------------------------------------------------------------- math
    def _reference_logps(self, batch: dict[str, Any]) -> CompletionLogps | None:
        if not self.objective.needs_reference:
            return None
        cache = self.ref_cache.get(batch["split"])
        if cache is not None:
            return cache.lookup(batch["indices"], device=batch["input_ids"].device)
        return self.reference.logps(batch)  # no grad, eval mode

    def _forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, MetricSums]:
        policy = completion_logps(model, batch, with_wpo=self.objective.use_weighting)
        ref = self._reference_logps(batch)
        inputs = preference_inputs(policy, ref, self.objective)
        out = compute_preference_loss(inputs, self.objective)
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

    def step(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, MetricSums]:
        return self._forward(model, batch)

    def eval_step(self, model: nn.Module, batch: dict[str, Any]) -> MetricSums:
        return self._forward(model, batch)[1]

    def end_step(self, global_step: int, metrics: dict[str, float]) -> None:
        if self.ref_sync is not None:
            self.ref_sync.after_step(global_step)


# ---------------------------------------------------------------- building the stage


def reference_sync(cfg: Any, reference: Reference | None, policy: nn.Module) -> ReferenceSync | None:
    """TR-DPO's reference update when --sync_ref_model is on (its flags were checked by check_ref_sync)."""
    if not cfg.sync_ref_model or reference is None:
        return None
    return ReferenceSync(reference, policy, cfg.ref_model_mixup_alpha, cfg.ref_model_sync_steps)


def checkpoint_io(model: nn.Module, tokenizer: Any, sync: ReferenceSync | None) -> dict[str, Any]:
    """train_and_save's save/load of checkpoints: the policy, and with TR-DPO the moved reference beside it (without
    it a resumed run would restart from the initial reference)."""
    if sync is None:
        return {}

    def save(directory: Path) -> None:
        save_model(model, tokenizer, directory, merge_adapter=False)
        sync.save(directory)

    def load(directory: Path) -> None:
        load_weights_into(model, directory)
        sync.load(directory)

    return {"save": save, "load": load}


def default_cache_dir() -> Path:
    """Reference log-prob caches live outside any run directory so that later runs with the same key reuse them."""
    root = os.environ.get("PREFALIGN_CACHE_DIR") or Path.home() / ".cache" / "prefalign"
    return Path(root) / "ref_logps"


def _precompute(cfg: DPOConfig, reference: Reference, train: list[TokenizedPair], eval_: list[TokenizedPair] | None,
                tokenizer: Any, processor: Any = None) -> dict[str, ReferenceCache]:
    """One reference pass before training, cached on disk under a fingerprint of model, data and settings."""
    settings = {k: getattr(cfg, k) for k in ("max_length", "max_prompt_length", "max_completion_length",
                                             "truncation_mode", "chat_template", "bf16", "fp16")}
    caches = {}
    for split, pairs in (("train", train), ("eval", eval_ or [])):
        if pairs:
            entries = precompute_reference(
                reference, pairs, lambda ps: collate_pairs(ps, tokenizer.pad_token_id, processor=processor),
                cfg.per_device_eval_batch_size, default_cache_dir(), fingerprint(reference_sources(cfg), pairs, settings),
            )
            caches[split] = ReferenceCache(entries)
    return caches


def train_dpo(cfg: DPOConfig) -> LoopResult:
    """Run DPO end to end: data → model → reference → loop → final model in cfg.output_dir."""
    objective, limits = resolve_dpo_config(cfg)
    session = open_session(cfg)
    train, eval_, stats = load_tokenized_pairs(cfg, session.tokenizer, limits, session.processor)
    model = trainable_policy(cfg, session, no_dropout=cfg.disable_dropout)
    reference = build_reference(model, cfg, objective.needs_reference)
    described = describe_reference(reference, cfg, why_none=f"{', '.join(cfg.loss_type)} needs none")
    ref_cache = None
    if cfg.precompute_ref_log_probs and reference is not None:
        ref_cache = _precompute(cfg, reference, train, eval_, session.tokenizer, session.processor)
        reference = None  # every step reads the cache: no reference forward, and a frozen copy can be freed
        described = f"log-probs of {described}, precomputed and cached on disk"
    packed, layout = use_packing(cfg, [model] + ([reference.model] if reference is not None else []))
    sync = reference_sync(cfg, reference, model)
    if sync is not None:
        described += f", moved towards the policy every {cfg.ref_model_sync_steps} steps (TR-DPO)"
    stage = DPOStage(cfg, objective, train, eval_, session.tokenizer.pad_token_id, reference, ref_cache, packed=packed,
                     ref_sync=sync, processor=session.processor)
    facts = RunFacts([SplitCount.of(split, s, "pairs") for split, s in stats.items()], "pairs", layout, described)
    return train_and_save(stage, model, cfg, session, "dpo", facts,
                          **checkpoint_io(model, session.saved_processing, sync))


def pair_metrics(policy: nn.Module, reference: nn.Module | None, tokenizer: Any, pairs: list[Pair],
                 cfg: DPOConfig, processor: Any = None) -> dict[str, float]:
    """DPO's evaluation metrics (`eval_` + DPO's metric names) of `policy` against `reference` on `pairs`, through
    the stage's own evaluation step. `reference` is a model (frozen, used as is) or None for a peft policy (its
    base, adapter disabled)."""
    if reference is None and not isinstance(policy, PeftModel):
        raise PrefalignError("a full model needs a reference model", "--ref_model_name_or_path")
    tokenized, _ = tokenize_pairs(pairs, tokenizer, Truncation.of(cfg), processor)
    ref = DisabledAdapterReference(policy) if reference is None else FrozenModelReference(reference)
    stage = DPOStage(cfg, preference_objective(cfg), [], tokenized, tokenizer.pad_token_id, ref, processor=processor)
    acc = accumulate_eval(stage, policy, [(g, True) for g in stage.eval_groups()], next(policy.parameters()).device)
    return {f"eval_{k}": v for k, v in acc.means().items()}
