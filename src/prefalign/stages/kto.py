"""KTO on unpaired feedback (and APO-zero-unpaired, BCO) on the shared loop.

The loss is TRL 1.16's KTOTrainer's (`losses.kto`): summed completion log-probs of policy and reference, the KL
reference point z from mismatched (prompt, completion) pairs with TRL's pairing (the k-th example's KL completion is
the (k−1)-th example's, the first takes the last's: a roll by one), scored without gradient, averaged, clamped at 0,
and the weighted per-example losses divided by the number of examples. Metrics carry TRL's names: kl, entropy,
logits/*, rewards/*, logps/* (means of summed log-probs), rewards/margins where both labels are present.

Where the same numbers live differs from TRL in one place, so that batch B × accumulation A gives the update of A·B × 1
on any number of processes: TRL pairs and averages within each per-device micro-batch; here the pairs are rolled over
the optimizer step's whole batch (every process's micro-batches, in order) and z is their mean (`begin_step`, before
any micro-batch is weighed). With one process and no accumulation the two are the same batch, pair for pair.

Layouts. A step runs, per micro-batch: the policy on prompt + completion (with gradient); the policy on prompt + KL
completion (no gradient); the reference on both. With the padding-free layout each is one packed row, and the
reference scores both completions of an example in ONE forward that runs their shared prompt once (the DPO
shared-prompt blocks). The policy's two passes cannot share the prompt: the KL pass must finish (z is needed by every
loss of the step) before the gradient pass starts. The policy's KL pass runs in eval mode, so dropout (off by
default, as in TRL) never perturbs z.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prefalign.config import KTOConfig
from prefalign.config.checks import check_ref_sync, check_train_args, require
from prefalign.data.collate import collate_padded_completions
from prefalign.data.packing import collate_packed_completions
from prefalign.data.tokenize import Truncation
from prefalign.data.types import TokenizedUnpaired
from prefalign.data.unpaired import balance_advice, label_summary, load_tokenized_feedback
from prefalign.errors import PrefalignError
from prefalign.losses.kto import (
    UNPAIRED_LOSSES,
    UNPAIRED_TRAITS,
    RunningMean,
    UnpairedInputs,
    UnpairedParams,
    kl_reference_point,
)
from prefalign.model.load import save_model
from prefalign.model.logprobs import CompletionLogps, completion_logps
from prefalign.model.reference import (
    Reference,
    ReferenceSync,
    build_reference,
    fingerprint,
    inference,
    precompute_sequence_logps,
    reference_sources,
)
from prefalign.model.weights import is_main_process, load_weights_into
from prefalign.stages.dpo import default_cache_dir, reference_sync, use_packing
from prefalign.train import distributed
from prefalign.train.loop import LoopResult, sequential_groups, shuffled_groups
from prefalign.train.metrics import MetricSums
from prefalign.train.optim import total_steps_for
from prefalign.train.runinfo import RunFacts, SplitCount, describe_reference
from prefalign.train.setup import open_session, train_and_save, trainable_policy

SAMPLING = ("random", "sequential")
BY_LABEL = ("rewards/chosen", "logps/chosen", "logits/chosen", "rewards/rejected", "logps/rejected", "logits/rejected")
Item = tuple[list[int], list[list[int]]]  # (prompt ids, its completions)


def kl_partners(order: Sequence[int]) -> dict[int, int]:
    """TRL's mismatched pairs over `order`: example k takes example k−1's completion, the first the last's."""
    return {i: order[k - 1] for k, i in enumerate(order)}


def resolve_kto_config(cfg: KTOConfig) -> tuple[UnpairedParams, Truncation]:
    """Everything that can be checked without loading a model or data, resolved once."""
    require(cfg, "model_name_or_path", "dataset_name")
    if cfg.loss_type not in UNPAIRED_LOSSES:
        raise PrefalignError(f"unknown loss {cfg.loss_type!r}; valid losses: {', '.join(UNPAIRED_LOSSES)}",
                             "--loss_type")
    if cfg.beta <= 0:
        raise PrefalignError(f"beta must be positive, got {cfg.beta}", "--beta")
    for flag in ("desirable_weight", "undesirable_weight"):
        if getattr(cfg, flag) < 0:
            raise PrefalignError(f"must not be negative, got {getattr(cfg, flag)}", f"--{flag}")
    if cfg.train_sampling_strategy not in SAMPLING:
        raise PrefalignError(f"must be random or sequential, got {cfg.train_sampling_strategy!r}",
                             "--train_sampling_strategy")
    limits = Truncation.of(cfg)
    check_ref_sync(cfg)
    check_train_args(cfg)
    return UnpairedParams(cfg.beta, cfg.desirable_weight, cfg.undesirable_weight), limits


class KTOStage:
    """Unpaired-feedback step for the loop (see train.loop.Stage)."""

    example_unit = "examples"
    progress_keys = {"loss": "loss", "kl": "kl", "rewards/margins": "margin"}

    def __init__(self, cfg: KTOConfig, params: UnpairedParams, train: list[TokenizedUnpaired],
                 eval_: list[TokenizedUnpaired] | None, pad_token_id: int, policy: nn.Module,
                 reference: Reference | None, accelerator: Any, packed: bool = False,
                 ref_sync: ReferenceSync | None = None) -> None:
        self.cfg, self.params, self.loss = cfg, params, UNPAIRED_LOSSES[cfg.loss_type]
        self.uses_kl = UNPAIRED_TRAITS[cfg.loss_type].uses_kl
        self.delta = RunningMean() if UNPAIRED_TRAITS[cfg.loss_type].uses_delta else None
        self.data = {"train": train, "eval": eval_ or []}
        self.pad_token_id, self.packed = pad_token_id, packed
        self.policy, self.reference, self.accelerator, self.ref_sync = policy, reference, accelerator, ref_sync
        self.cached: dict[str, dict[tuple[int, int], float]] = {}  # split -> (prompt i, completion j) -> ref logp
        self._kl = 0.0  # z of the current optimizer step
        self._ref: dict[int, float] = {}  # reference log-probs of this process's completions of the current step
        self._step_examples = 0

    # ---------------------------------------------------------------- data
    def train_groups(self, epoch: int) -> list[list[int]]:
        n, b = len(self.data["train"]), self.cfg.per_device_train_batch_size
        if self.cfg.train_sampling_strategy == "sequential":
            return sequential_groups(n, b)
        return shuffled_groups(n, b, self.cfg.seed, epoch)

    def eval_groups(self) -> list[list[int]]:
        return sequential_groups(len(self.data["eval"]), self.cfg.per_device_eval_batch_size)

    def batch_weight(self, group: Sequence[int], split: str) -> float:
        return float(len(group))

    def _collate(self, items: Sequence[Item]) -> dict[str, Any]:
        if self.packed:  # completions after the first attend to the item's prompt as a shared prefix
            return collate_packed_completions([(p, cs, "") for p, cs in items], self.pad_token_id, share_prompt=True)
        return collate_padded_completions(items, self.pad_token_id)

    def _items(self, split: str, pairs: Sequence[tuple[int, int]]) -> list[Item]:
        data = self.data[split]
        return [(data[i].prompt_ids, [data[j].completion_ids]) for i, j in pairs]

    def make_batch(self, group: Sequence[int], split: str) -> dict[str, Any]:
        examples = [self.data[split][i] for i in group]
        batch = self._collate([(e.prompt_ids, [e.completion_ids]) for e in examples])
        batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.bool)  # (B,)
        batch["num_tokens"] = sum(e.num_tokens for e in examples)  # prompt + completion, as TRL counts them
        batch["indices"] = list(group)
        if split == "train":
            batch["ref_logps"] = torch.tensor([self._ref[i] for i in group], dtype=torch.float32)  # (B,)
        return batch

    # ---------------------------------------------------------------- reference and KL pairs
    def _sums(self, model: nn.Module, items: Sequence[Item]) -> Tensor:
        """(K·B,) summed completion log-probs of `items` under `model`, completion-major (no grad, eval mode)."""
        batch = {k: v.to(self.accelerator.device) if isinstance(v, Tensor) else v
                 for k, v in self._collate(items).items()}
        with inference(model):
            return completion_logps(model, batch).token_logps.sum(-1)

    def _reference_sums(self, split: str, group: Sequence[int], partner: dict[int, int]) -> tuple[Tensor, Tensor | None]:
        """Reference log-probs of the group's completions and (for KTO) KL completions: one shared-prompt pass, or
        the precomputed values."""
        if split in self.cached:
            cache = self.cached[split]
            device = self.accelerator.device
            main = torch.tensor([cache[(i, i)] for i in group], device=device)
            if not self.uses_kl:
                return main, None
            return main, torch.tensor([cache[(i, partner[i])] for i in group], device=device)
        data = self.data[split]
        items = [(data[i].prompt_ids, [data[i].completion_ids] + ([data[partner[i]].completion_ids]
                                                                  if self.uses_kl else [])) for i in group]
        assert self.reference is not None
        with self.reference.weights():
            sums = self._sums(self.reference.model, items)
        b = len(group)
        return sums[:b], (sums[b:] if self.uses_kl else None)

    def _kl_sum(self, split: str, group: Sequence[int], partner: dict[int, int], ref_kl: Tensor) -> Tensor:
        policy_kl = self._sums(self.policy, self._items(split, [(i, partner[i]) for i in group]))
        return (policy_kl - ref_kl).sum()

    def begin_step(self, groups: Sequence[Sequence[int]]) -> None:
        """This optimizer step's KL pairs and z over all of them (every process's share, reduced), and the reference
        log-probs of this process's completions; before any micro-batch of the step is weighed or built."""
        order = [i for g in groups for i in g]
        partner = kl_partners(order)
        self._step_examples, self._ref = len(order), {}
        device = self.accelerator.device
        kl_sum = torch.zeros((), dtype=torch.float64, device=device)
        with self.accelerator.autocast():
            for group, counts in distributed.pad_groups(groups, self.accelerator.process_index,
                                                        self.accelerator.num_processes):
                ref_main, ref_kl = self._reference_sums("train", group, partner)
                if ref_kl is not None:
                    step_kl = self._kl_sum("train", group, partner, ref_kl)  # padding groups run, for collectives
                    kl_sum += step_kl.double() if counts else 0.0
                self._ref.update(zip(group, ref_main.float().cpu().tolist()))  # a padding batch is built too
        if self.uses_kl:
            if self.accelerator.num_processes > 1:
                kl_sum = self.accelerator.reduce(kl_sum, reduction="sum")
            self._kl = float(kl_reference_point(kl_sum, len(order)))

    # ---------------------------------------------------------------- math
    def _forward(self, model: nn.Module, batch: dict[str, Any], ref_logps: Tensor, kl: float
                 ) -> tuple[Tensor, MetricSums]:
        policy = completion_logps(model, batch, with_entropy=True)  # rows = the micro-batch's examples
        logps = policy.token_logps.sum(-1)  # (B,) sums over completion tokens
        device = logps.device
        delta = None if self.delta is None else torch.tensor(self.delta.mean, device=device)
        inputs = UnpairedInputs(logps, ref_logps.to(device), batch["labels"], torch.tensor(kl, device=device), delta)
        out = self.loss(inputs, self.params)
        return out.losses.sum(), self._metrics(out.losses, out.rewards, inputs, policy, kl)

    def _metrics(self, losses: Tensor, rewards: Tensor, x: UnpairedInputs, policy: CompletionLogps,
                 kl: float) -> MetricSums:
        d = x.labels.float()  # (B,)
        u = 1.0 - d
        tokens = policy.mask.sum(-1).float()  # (B,)
        logps, mean_logits = x.logps.detach(), policy.logits_mean_sum
        entropy = policy.entropy.sum() if policy.entropy is not None else torch.zeros((), device=d.device)
        values = torch.stack([  # one host transfer for every metric of the micro-batch
            losses.detach().sum(), (rewards * d).sum(), (logps * d).sum(), (mean_logits * d).sum(), (tokens * d).sum(),
            d.sum(), (rewards * u).sum(), (logps * u).sum(), (mean_logits * u).sum(), (tokens * u).sum(), u.sum(),
            entropy, tokens.sum(), rewards.sum(),
        ]).double().tolist()
        loss, rc, lc, gc, tc, nd, rr, lr, gr, tr, nu, ent, ntok, rsum = values
        b = float(len(d))
        metrics: MetricSums = {"loss": (loss, b), "kl": (kl, 1.0), "entropy": (ent, ntok),
                               "rewards/chosen": (rc, nd), "logps/chosen": (lc, nd), "logits/chosen": (gc, tc),
                               "rewards/rejected": (rr, nu), "logps/rejected": (lr, nu), "logits/rejected": (gr, tr)}
        if self.delta is not None:
            metrics["delta"] = (self.delta.mean, 1.0)
            metrics["_rewards"] = (rsum, b)  # the step's mean reward: BCO's running mean moves by it at end_step
        return metrics

    def step(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, MetricSums]:
        return self._forward(model, batch, batch["ref_logps"], self._kl)

    def eval_step(self, model: nn.Module, batch: dict[str, Any]) -> MetricSums:
        """An evaluation micro-batch is its own KL batch (pairs rolled within it), as in TRL."""
        group = batch["indices"]
        partner = kl_partners(group)
        ref_main, ref_kl = self._reference_sums("eval", group, partner)
        kl = 0.0
        if ref_kl is not None:
            kl = float(kl_reference_point(self._kl_sum("eval", group, partner, ref_kl), len(group)))
        return self._forward(model, batch, ref_main, kl)[1]

    def finish_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Drop the label metrics of a label the batch did not have (TRL logs none); margins where both are there."""
        out = {k: v for k, v in metrics.items() if not k.startswith("_") and not (k in BY_LABEL and math.isnan(v))}
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out

    def end_step(self, global_step: int, metrics: dict[str, float]) -> None:
        if self.ref_sync is not None:
            self.ref_sync.after_step(global_step)
        if self.delta is not None and "_rewards" in metrics:
            self.delta.update(metrics["_rewards"] * self._step_examples, self._step_examples)

    # ---------------------------------------------------------------- precomputed reference
    def run_pairs(self, num_processes: int) -> list[tuple[int, int]]:
        """Every (prompt, completion) pair of the training data the run will score: each example's own completion
        and its KL completion in every epoch the run reaches (the pairs follow the shuffled steps)."""
        pairs = {(i, i) for i in range(len(self.data["train"]))}
        if self.uses_kl:
            per_step = self.cfg.gradient_accumulation_steps * num_processes
            groups = self.train_groups(0)
            total = total_steps_for(self.cfg, len(groups), num_processes)
            steps_per_epoch = max(1, math.ceil(len(groups) / per_step))
            for epoch in range(math.ceil(total / steps_per_epoch)):
                groups = self.train_groups(epoch)
                for start in range(0, len(groups), per_step):
                    order = [i for g in groups[start:start + per_step] for i in g]
                    pairs.update(kl_partners(order).items())
        return sorted(pairs)

    def eval_pairs(self) -> list[tuple[int, int]]:
        pairs = {(i, i) for i in range(len(self.data["eval"]))}
        if self.uses_kl:
            for group in self.eval_groups():
                pairs.update(kl_partners(group).items())
        return sorted(pairs)

    def precompute(self, sources: list[str], settings: dict[str, Any], cache_dir: Path) -> None:
        """Score every pair the run needs with the reference once (cached on disk), then drop the reference."""
        assert self.reference is not None
        for split, pairs in (("train", self.run_pairs(self.accelerator.num_processes)), ("eval", self.eval_pairs())):
            if not self.data[split]:
                continue
            items = self._items(split, pairs)
            key = fingerprint(sources, [], {**settings, "items": _digest(items)})

            def collate(chunk: Sequence[Item]) -> dict[str, Any]:
                return collate_padded_completions(chunk, self.pad_token_id)

            values = precompute_sequence_logps(self.reference, items, collate, self.cfg.per_device_eval_batch_size,
                                               cache_dir, key)
            self.cached[split] = dict(zip(pairs, values.tolist()))
        self.reference = None  # every step reads the cache; a frozen copy can be freed


def _digest(items: Sequence[Item]) -> str:
    h = hashlib.sha256()
    for prompt, completions in items:
        for ids in (prompt, *completions):
            h.update(array("q", [len(ids), *ids]).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- building the stage


def _checkpoint_io(stage: KTOStage, model: nn.Module, tokenizer: Any) -> dict[str, Any]:
    """Checkpoints hold the policy, the moved reference (TR-DPO) and BCO's running reward mean."""
    if stage.ref_sync is None and stage.delta is None:
        return {}

    def save(directory: Path) -> None:
        save_model(model, tokenizer, directory, merge_adapter=False)
        if stage.ref_sync is not None:
            stage.ref_sync.save(directory)
        if stage.delta is not None and is_main_process():
            (directory / "bco_running.json").write_text(json.dumps(stage.delta.state()))

    def load(directory: Path) -> None:
        load_weights_into(model, directory)
        if stage.ref_sync is not None:
            stage.ref_sync.load(directory)
        if stage.delta is not None:
            stage.delta = RunningMean(**json.loads((directory / "bco_running.json").read_text()))

    return {"save": save, "load": load}


def train_kto(cfg: KTOConfig) -> LoopResult:
    """Run KTO end to end: feedback rows → examples → model → reference → loop → final model in cfg.output_dir."""
    params, limits = resolve_kto_config(cfg)
    session = open_session(cfg)
    world = session.accelerator.num_processes
    if UNPAIRED_TRAITS[cfg.loss_type].uses_kl and cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps \
            * world < 2:
        raise PrefalignError("an optimizer step needs at least 2 examples (per-device batch x accumulation x "
                             "processes): with one, its KL completion is its own and the KL term equals the implied "
                             "reward", "--per_device_train_batch_size")
    train, eval_, stats = load_tokenized_feedback(cfg, session.tokenizer, limits)
    advice = balance_advice(sum(e.label for e in train), sum(not e.label for e in train), cfg.desirable_weight,
                            cfg.undesirable_weight)
    if advice:
        session.print(f"warning: {advice}")
    model = trainable_policy(cfg, session, no_dropout=cfg.disable_dropout)
    reference = build_reference(model, cfg, True)
    packed, layout = use_packing(cfg, [model] + ([reference.model] if reference is not None else []))
    stage = KTOStage(cfg, params, train, eval_, session.tokenizer.pad_token_id, model, reference,
                     session.accelerator, packed, reference_sync(cfg, reference, model))
    described = describe_reference(reference, cfg)
    if cfg.precompute_ref_log_probs:
        settings = {k: getattr(cfg, k) for k in ("max_length", "max_prompt_length", "max_completion_length",
                                                 "truncation_mode", "chat_template", "bf16", "fp16")}
        stage.precompute(reference_sources(cfg), settings, default_cache_dir())
        described = f"log-probs of {described}, precomputed and cached on disk"
    if stage.ref_sync is not None:
        described += f", moved towards the policy every {cfg.ref_model_sync_steps} steps (TR-DPO)"
    splits = [SplitCount.of(split, s, "examples") for split, s in stats.items()]
    splits = [dataclasses.replace(c, notes=f"{c.notes}; {label_summary(data)}")
              for c, data in zip(splits, (train, eval_))]
    facts = RunFacts(splits, "examples", layout, described)
    return train_and_save(stage, model, cfg, session, "kto", facts, **_checkpoint_io(stage, model, session.tokenizer))
