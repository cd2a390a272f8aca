"""The one on-policy stage GRPO, RLOO, PPO and online DPO share, and the algorithm objects composed into it.

A rollout is a batch of prompts, each sampled `num_generations` times (`rollout.sampling`), scored by the reward
functions and/or reward model, and handed to an `Algorithm`, which adds what it needs (old-policy and reference
log-probs, advantages, values) and later computes the loss of each micro-batch. The stage owns what every
algorithm shares: which prompts each rollout samples (a (seed, epoch, rollout)-seeded plan, `rollout.schedule`),
the loop hook where a rollout is sampled (`begin_step`, called by the loop before it weighs an optimizer step's
micro-batches), the micro-batches' weights and the metrics tail.

An algorithm is an object, not a subclass: GRPO (`stages.grpo`), RLOO (`stages.rloo`), PPO (`stages.ppo`) and
online DPO (`stages.online_dpo`) each say how a rollout's rows split into micro-batches over its optimizer steps,
what to compute from a scored rollout, and the loss.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from prefalign.config.checks import check_train_args, require
from prefalign.config.rollout import OnPolicyArgs
from prefalign.errors import PrefalignError
from prefalign.losses.grpo import EXTREME_METRICS
from prefalign.model.load import save_model
from prefalign.model.packed import supports_packing
from prefalign.model.reference import Reference, build_reference
from prefalign.model.weights import load_weights_into
from prefalign.rollout.generate import mask_truncated_completions
from prefalign.rollout.rewards import load_reward_functions
from prefalign.rollout.sampling import (
    CompletionGroups,
    RolloutSampler,
    completion_metrics,
    load_samplers,
    reward_columns,
    score,
    take_rows,
)
from prefalign.rollout.schedule import RolloutPlan, RolloutRows, rollout_seed
from prefalign.train.distributed import all_finished, gather_rows, is_sharded
from prefalign.train.loop import LoopResult, sequential_groups
from prefalign.train.metrics import Extreme, MetricSums, to_host
from prefalign.train.runinfo import RunFacts, SplitCount, describe_reference
from prefalign.train.setup import Session, open_session, train_and_save, trainable_policy
from prefalign.train.zero import generation_weights


class Batching(Protocol):
    """How a rollout's rows are split into micro-batches over its optimizer steps."""

    def rollout_rows(self, step_rows: int) -> int: ...  # completions per rollout, given one optimizer step's

    def micro_batches(self, epoch: int, r: int, rows: int) -> list[tuple[int, ...]]:
        """Row tuples of rollout r's micro-batches in loop order, over all of its optimizer steps."""
        ...


@dataclass(frozen=True)
class RepeatedPasses:
    """One optimizer step per pass over the rollout, `passes` passes (GRPO's num_iterations), rows in order."""

    batch_size: int
    passes: int = 1

    def rollout_rows(self, step_rows: int) -> int:
        return step_rows

    def micro_batches(self, epoch: int, r: int, rows: int) -> list[tuple[int, ...]]:
        one_pass = [tuple(range(k, k + self.batch_size)) for k in range(0, rows, self.batch_size)]
        return one_pass * self.passes


@dataclass(frozen=True)
class ShuffledMiniBatches:
    """PPO's schedule: `epochs` passes over the rollout, each a fresh (seed, epoch, rollout, pass) shuffle split
    into `mini_batches` optimizer steps."""

    batch_size: int
    mini_batches: int
    epochs: int
    seed: int

    def rollout_rows(self, step_rows: int) -> int:
        return step_rows * self.mini_batches  # one optimizer step per mini-batch

    def micro_batches(self, epoch: int, r: int, rows: int) -> list[tuple[int, ...]]:
        out = []
        for ppo_epoch in range(self.epochs):
            generator = torch.Generator().manual_seed(rollout_seed(self.seed, epoch, r) + ppo_epoch)
            order = torch.randperm(rows, generator=generator).tolist()
            out += [tuple(order[k : k + self.batch_size]) for k in range(0, len(order), self.batch_size)]
        return out


@dataclass
class ScoredRollout:
    """A whole rollout (every process's share), sampled and scored: what an algorithm's `prepare` reads."""

    groups: CompletionGroups  # the prompts and completions, rows grouped by prompt
    is_truncated: Tensor  # (N,) bool
    loss_mask: Tensor  # (N, Tc) the completion mask, truncated completions zeroed with --mask_truncated_completions
    rewards: Tensor  # (N,) weighted rewards, nan where no reward function scored the completion
    passes: dict[str, Tensor]  # what the algorithm's `forward_passes` computed, (N, ...) per row


class Algorithm(Protocol):
    """What an on-policy algorithm adds to the shared rollout stage. Optionally also `save_extra(directory)` /
    `load_extra(directory)`: what a checkpoint holds besides the policy (PPO's value model), and
    `row_weighted_metrics = True` when the metrics `loss` returns are means over rows, not tokens (online DPO's
    per-pair metrics), `batch_unit` when --per_device_train_batch_size counts something else than completions, and
    `forward_rows(rows, tensors)` when the loss's forwards score only some of a micro-batch's rows, in its own order
    (online DPO's pairs; the micro-batch's per-row tensors still hold all of `rows`)."""

    model: nn.Module  # what the loop optimises (the policy, or PPO's policy + value)
    policy: nn.Module  # what samples, and what is saved as the final model
    num_generations: int  # completions per prompt
    per_token: bool  # micro-batches weigh their real loss tokens (False: their completions)
    shares_prompts: bool  # its forwards can take the shared-prompt packed layout (`CompletionGroups.batch`)
    batching: Batching
    progress_keys: dict[str, str]
    eval_reward_name: str  # the metric name of the held-out reward
    # optional: `sequence_metrics`, names of loss metrics that are means over completions (default: over tokens)

    def forward_passes(self, groups: CompletionGroups, loss_mask: Tensor, packed: bool) -> dict[str, Tensor]:
        """Per-row tensors computed by models, without grad, on this process's share of a rollout (old-policy and
        reference log-probs, values); the stage gathers them into the whole rollout."""
        ...

    def prepare(self, rollout: ScoredRollout) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Per-row tensors to keep with the whole rollout (advantages, ...) and the rollout's metrics."""
        ...

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """The micro-batch's loss, a mean over its loss tokens (per_token) or completions, and token metrics."""
        ...


class RolloutStage:
    """The loop stage of every on-policy algorithm (see train.loop.Stage): training micro-batches are rows of
    rollouts, sampled at `begin_step`; evaluation batches are held-out prompts, one sampled completion each.

    With several processes each one samples, scores and runs the algorithm's forward passes on its share of a
    rollout's prompts (whole groups, so group statistics need no communication), then the per-row results are
    gathered, so that every process holds the whole rollout and the loop hands out micro-batches as usual. The
    random draws of a row do not depend on which process samples it (`rollout.generate.RowNoise`): N processes
    train on what one process would."""

    example_unit = "completions"

    def __init__(self, cfg: OnPolicyArgs, algorithm: Algorithm, train: RolloutSampler,
                 eval_: RolloutSampler | None, reward_fns: list, accelerator: Any, packed: bool = False) -> None:
        self.cfg, self.algorithm, self.reward_fns, self.accelerator = cfg, algorithm, reward_fns, accelerator
        self.packed = packed and algorithm.shares_prompts
        self.samplers = {"train": train, "eval": eval_}
        world = accelerator.num_processes
        self.micro_per_step = cfg.gradient_accumulation_steps * world
        step_rows = cfg.per_device_train_batch_size * self.micro_per_step
        self.rows = algorithm.batching.rollout_rows(step_rows)
        self.plan = RolloutPlan(len(train.examples), self.rows // algorithm.num_generations, cfg.seed)
        self.progress_keys = algorithm.progress_keys
        self._current: tuple[tuple[int, int], dict[str, Any]] | None = None

    # ---------------------------------------------------------------- the loop's hooks
    def train_groups(self, epoch: int) -> list[RolloutRows]:
        return [RolloutRows(epoch, r, rows) for r in range(len(self.plan(epoch)))
                for rows in self.algorithm.batching.micro_batches(epoch, r, self.rows)]

    def eval_groups(self) -> list[list[int]]:
        eval_ = self.samplers["eval"]
        return sequential_groups(len(eval_.examples) if eval_ else 0, self.cfg.per_device_eval_batch_size)

    def begin_step(self, groups: Sequence[RolloutRows]) -> None:
        """Sample and score the rollout this optimizer step's micro-batches come from, unless it is the current one
        (a rollout spans several optimizer steps)."""
        key = (groups[0].epoch, groups[0].rollout)
        if self._current is None or self._current[0] != key:
            self._current = (key, self._sample(*key))

    def batch_weight(self, group: Any, split: str) -> float:
        if split != "train" or not self.algorithm.per_token:
            return float(len(group))
        rollout = self._current[1]
        if rollout["total_tokens"] == 0:  # every completion masked: the loss is 0, any positive weight will do
            return 1.0
        return float(rollout["loss_mask"][list(group.rows)].sum())

    def make_batch(self, group: Any, split: str) -> dict[str, Any]:
        if split != "train":
            return {"indices": list(group)}
        rollout = self._current[1]
        # the rows the loss's forwards score: all of them, or the algorithm's choice (online DPO's pairs)
        forward_rows = getattr(self.algorithm, "forward_rows", None)
        rows = forward_rows(group.rows, rollout["tensors"]) if forward_rows else group.rows
        batch = rollout["groups"].batch(rows, self.packed)
        batch.update(take_rows(rollout["tensors"], group.rows))
        batch["rollout_metrics"] = rollout["metrics"]
        return batch

    def step(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, MetricSums]:
        loss, token_metrics = self.algorithm.loss(model, batch)
        mask = batch["loss_mask"]  # (b, Tc)
        tokens_t = mask.sum().to(loss.dtype)
        rows = float(mask.size(0))
        # undo the micro-batch normalisation: the loop divides by the step's weight
        loss_sum = loss * (tokens_t if self.algorithm.per_token else rows)
        host = to_host({"tokens": tokens_t, "loss": loss_sum, **token_metrics})
        tokens = host.pop("tokens")
        metrics: MetricSums = {"loss": (host.pop("loss"), tokens if self.algorithm.per_token else rows)}
        # metric means over the micro-batch's loss tokens; over its completions for `sequence_metrics`, or for all of
        # them with `row_weighted_metrics` (online DPO's per-pair metrics); min / max for EXTREME_METRICS
        per_completion = getattr(self.algorithm, "sequence_metrics", frozenset())
        by_rows = getattr(self.algorithm, "row_weighted_metrics", False)
        for name, value in host.items():
            kind = EXTREME_METRICS.get(name)
            weight = rows if by_rows or name in per_completion else tokens
            metrics[name] = Extreme(kind, value) if kind else (value * weight, weight)
        metrics.update({k: (v, 1.0) for k, v in batch["rollout_metrics"].items()})
        return loss_sum, metrics

    def eval_step(self, model: nn.Module, batch: dict[str, Any]) -> MetricSums:
        return eval_rewards(self.samplers["eval"], self.algorithm.policy, batch["indices"], self.reward_fns,
                            self.cfg, self.algorithm.eval_reward_name, self._all_done())

    # ---------------------------------------------------------------- one rollout
    def _when(self, epoch: int, r: int) -> str:
        """'at step 5 (rollout 2 of epoch 1)': the first optimizer step that trains on rollout r, for messages."""
        steps = len(self.algorithm.batching.micro_batches(epoch, r, self.rows)) // self.micro_per_step
        step = (epoch * len(self.plan(epoch)) + r) * steps + 1
        return f"at step {step} (rollout {r + 1} of epoch {epoch + 1})"

    def _all_done(self) -> Callable[[Tensor], bool] | None:
        """Sharded, every process decodes until all are done (each forward holds collectives)."""
        return all_finished if is_sharded(self.algorithm.policy) else None

    def _sample(self, epoch: int, r: int) -> dict[str, Any]:
        """Rollout r of the epoch: this process samples, scores and runs the forward passes on its share of the
        prompts; the rows are gathered and the algorithm prepares the whole rollout."""
        cfg, algorithm, sampler = self.cfg, self.algorithm, self.samplers["train"]
        when = self._when(epoch, r)
        prompts, g = self.plan(epoch)[r], algorithm.num_generations
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        share = len(prompts) // world  # whole groups per process (the configs' checks make it divide)
        with generation_weights(algorithm.policy):  # ZeRO-3: the policy's weights gathered once
            s = sampler.sample(algorithm.policy, prompts[rank * share : (rank + 1) * share], g,  # type: ignore[union-attr]
                               rollout_seed(cfg.seed, epoch, r), first_row=rank * share * g,
                               total_rows=len(prompts) * g, all_done=self._all_done())
        device = self.accelerator.device
        local = s.groups
        local.completion_ids, local.completion_mask = local.completion_ids.to(device), local.completion_mask.to(device)
        local_mask = self._loss_mask(local.completion_mask, s.is_truncated.to(device))
        passes = algorithm.forward_passes(local, local_mask, self.packed)
        rows = gather_rows(self.accelerator, {
            "completion_ids": local.completion_ids, "token_mask": local.completion_mask,
            "is_truncated": s.is_truncated.to(device), "rewards": reward_columns(self.reward_fns, s, when).T.to(device),
            **passes})
        groups = CompletionGroups([sampler.prompt_ids[i] for i in prompts], g, rows["completion_ids"],  # type: ignore[union-attr]
                                  rows["token_mask"], local.pad_token_id)
        rewards, metrics = score(self.reward_fns, cfg.reward_weights, rows["rewards"].T, when, require_any=True)
        loss_mask = self._loss_mask(groups.completion_mask, rows["is_truncated"])
        scored = ScoredRollout(groups, rows["is_truncated"], loss_mask, rewards.to(device),
                               {k: rows[k] for k in passes})
        kept, algorithm_metrics = algorithm.prepare(scored)
        metrics.update(algorithm_metrics)
        metrics.update(completion_metrics(groups.completion_mask, rows["is_truncated"]))
        loss_mask_host = loss_mask.cpu()
        return {"groups": groups, "tensors": {"token_mask": groups.completion_mask, "loss_mask": loss_mask, **kept},
                "loss_mask": loss_mask_host, "total_tokens": int(loss_mask_host.sum()), "metrics": metrics}

    def _loss_mask(self, token_mask: Tensor, is_truncated: Tensor) -> Tensor:
        if self.cfg.mask_truncated_completions:
            return mask_truncated_completions(token_mask, is_truncated)
        return token_mask


def eval_rewards(sampler: RolloutSampler, model: nn.Module, indices: list[int], reward_fns: list, cfg: Any,
                 reward_name: str = "reward", all_done: Callable[[Tensor], bool] | None = None) -> MetricSums:
    """One sampled completion per held-out prompt, scored by the training rewards."""
    with generation_weights(model):
        s = sampler.sample(model, indices, 1, rollout_seed(cfg.seed, -1, indices[0]), all_done=all_done)
    rewards, per_fn = score(reward_fns, cfg.reward_weights, reward_columns(reward_fns, s, "in evaluation"),
                            "in evaluation")
    n = float(len(indices))
    out: MetricSums = {reward_name: (float(torch.nansum(rewards)), float((~torch.isnan(rewards)).sum()))}
    out.update({k: (v * n, n) for k, v in per_fn.items() if k.endswith("/mean")})
    out["completions/mean_length"] = (float(s.token_mask.sum()), n)
    return out


# ---------------------------------------------------------------- checks and the driver every algorithm uses


def check_rl_config(cfg: OnPolicyArgs, needs_rewards: bool = True) -> None:
    """What every on-policy command can check before loading anything."""
    require(cfg, "model_name_or_path", "dataset_name")
    if not cfg.max_completion_length or cfg.max_completion_length < 1:
        raise PrefalignError("must be a positive number of tokens", "--max_completion_length")
    if cfg.temperature <= 0:
        raise PrefalignError(f"must be > 0 for sampling, got {cfg.temperature}", "--temperature")
    if not 0 < cfg.top_p <= 1:
        raise PrefalignError(f"must be in (0, 1], got {cfg.top_p}", "--top_p")
    if cfg.use_vllm:
        check_vllm()
    if needs_rewards and not cfg.reward_funcs and not cfg.reward_model_name_or_path:
        raise PrefalignError("give --reward_funcs and/or --reward_model_name_or_path", "--reward_funcs")
    check_train_args(cfg)


def check_group_config(cfg: Any) -> None:
    """What GRPO and RLOO check about their groups: at least 2 completions, whole groups per process's step."""
    g, per_step = cfg.num_generations, cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    if g < 2:
        raise PrefalignError(f"must be at least 2 (advantages compare completions of a prompt), got {g}",
                             "--num_generations")
    if per_step % g:
        raise PrefalignError(f"per_device_train_batch_size x gradient_accumulation_steps = {per_step} completions "
                             f"per step must be a multiple of num_generations = {g}", "--num_generations")
    if cfg.num_iterations < 1:
        raise PrefalignError(f"must be at least 1, got {cfg.num_iterations}", "--num_iterations")


def check_vllm() -> None:
    if not torch.cuda.is_available():
        raise PrefalignError("vLLM generation needs a CUDA GPU and none is available; drop --use_vllm", "--use_vllm")
    if importlib.util.find_spec("vllm") is None:
        raise PrefalignError("vLLM is not installed (pip install vllm); or drop --use_vllm", "--use_vllm")
    raise PrefalignError("the vLLM backend is not part of this version yet; drop --use_vllm", "--use_vllm")


def use_shared_prompts(cfg: Any, models: list[nn.Module], report: Callable[[str], Any]) -> bool:
    """Whether the training forwards run each group's prompt once (the packed layout); else a one-line notice."""
    if not getattr(cfg, "share_prompt", False):
        return False
    for model in models:
        ok, reason = supports_packing(model)
        if not ok:
            report(f"shared-prompt batches are not supported here ({reason}); using padded batches")
            return False
    return True


AlgorithmFactory = Callable[[nn.Module, Reference | None, Session], Algorithm]


def train_online(cfg: OnPolicyArgs, make_algorithm: AlgorithmFactory, run_name: str,
                 needs_reference: bool, why_no_reference: str = "--beta 0") -> LoopResult:
    """An on-policy run end to end, after its checks: prompts → policy and reference → the algorithm → rollouts on
    the loop → final policy in cfg.output_dir."""
    session = open_session(cfg)
    train, eval_ = load_samplers(cfg, session.tokenizer)
    conversational = any(e.is_conversational for e in train.examples)
    reward_fns = load_reward_functions(cfg, session.device, session.tokenizer, conversational, session.print)
    policy = trainable_policy(cfg, session, no_dropout=cfg.disable_dropout)
    reference = build_reference(policy, cfg, needs_reference)
    algorithm = make_algorithm(policy, reference, session)
    packed = algorithm.shares_prompts and use_shared_prompts(cfg, [policy] + ([reference.model] if reference else []),
                                                             session.print)
    stage = RolloutStage(cfg, algorithm, train, eval_, reward_fns, session.accelerator, packed)
    facts = rollout_facts(cfg, stage, describe_reference(reference, cfg, why_none=why_no_reference),
                          session.accelerator.num_processes)

    save_extra, load_extra = getattr(algorithm, "save_extra", None), getattr(algorithm, "load_extra", None)

    def save(directory: Path) -> None:
        save_model(policy, session.tokenizer, directory, False)
        if save_extra is not None:
            save_extra(directory)

    def load(directory: Path) -> None:
        load_weights_into(policy, directory)
        if load_extra is not None:
            load_extra(directory)

    return train_and_save(stage, algorithm.model, cfg, session, run_name, facts, final_model=policy, save=save,
                          load=load)


def rollout_facts(cfg: OnPolicyArgs, stage: RolloutStage, reference: str, num_processes: int) -> RunFacts:
    """The start-of-run block's facts of an on-policy run: prompts per split, and how big a rollout is and how many
    optimizer steps train on it."""
    splits = [SplitCount(name, len(s.examples), None, "prompts", f"{s.truncated} cut to --max_prompt_length")
              for name, s in stage.samplers.items() if s is not None]
    g = stage.algorithm.num_generations
    per_step = cfg.gradient_accumulation_steps * num_processes
    steps = len(stage.algorithm.batching.micro_batches(0, 0, stage.rows)) // per_step
    rollout = (f"{stage.rows} completions ({stage.rows // g} prompts x {g}), each prompt prefilled once, "
               f"trained on for {steps} optimizer step{'s' if steps > 1 else ''}")
    unit = getattr(stage.algorithm, "batch_unit", "completions")  # what --per_device_train_batch_size counts
    layout = ("packed: each group's prompt once, its completions attending to it" if stage.packed
              else "padded prompt + completion rows")
    return RunFacts(splits, unit, layout, reference, {"rollout": rollout})
