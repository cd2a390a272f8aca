"""GRPO (`prefalign grpo`) on the shared loop; rollouts come from `train.rollout` (shared with RLOO and PPO).

One optimizer step = one rollout: B x A x processes completions (`--per_device_train_batch_size` counts
completions, as in TRL), i.e. that many / `--num_generations` prompts, each sampled G times with the KV cache.
The rollout is scored by the reward functions, turned into group advantages, and kept for `--num_iterations`
optimizer steps; its old-policy log-probs are computed once when they are needed (num_iterations > 1, or RLOO's
KL-in-reward), the reference's once when `--beta` != 0. Rollouts are seeded by (seed, epoch, rollout), so a run
is reproducible and resumable (see `train.rollout`).

Loss normalisation. The loop divides the summed micro-batch losses by the summed `batch_weight` of the step, so
`step` returns sums and batch B x A equals A·B x 1 for every loss type:
- grpo:     sum over completions of (token mean of the completion) / completions in the step (TRL's value).
- dr_grpo:  sum over tokens / max_completion_length / completions in the step (TRL's value).
- dapo:     sum over tokens / real tokens in the step (TRL's value: num_items_in_batch).
- bnpo:     the same token mean over the whole step. TRL takes the token mean of each micro-batch and averages
            those, which depends on how the step is split; the two agree at gradient_accumulation_steps=1 on one
            process, and bnpo equals dapo here.
Log-probs are those of the temperature-scaled logits (TRL's choice), so the policy optimised is the sampler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from prefalign.config import DataArgs, ModelArgs, TrainArgs
from prefalign.errors import PrefalignError
from prefalign.losses.policy import GRPO_NORMALIZERS, SCALE_REWARDS, group_advantages, grpo_loss
from prefalign.model.logprobs import completion_logps
from prefalign.train.metrics import MetricSums, to_host
from prefalign.train.rollout import (
    GenerationArgs,
    RewardArgs,
    RolloutSampler,
    RolloutSchedule,
    RolloutStage,
    check_rl_config,
    eval_rewards,
    load_reward_functions,
    load_rl_data,
    reference_weights,
    rollout_logps,
)
from prefalign.train.run import disable_dropout, print_summary

# ----------------------------------------------------------------------------------------------- configuration


@dataclass
class GRPOArgs:
    beta: float = 0.0
    """Weight of the per-token k3 KL to the reference in the loss; 0 loads no reference."""
    loss_type: str = "dapo"
    """How per-token losses are averaged: grpo (per completion, then over completions), bnpo, dr_grpo
    (divide by max_completion_length) or dapo (over every token of the step)."""
    scale_rewards: str = "group"
    """Divide advantages by the std of the group, of the whole batch, or none (Dr. GRPO)."""
    epsilon: float = 0.2
    """Lower clipping bound of the importance ratio: 1 - epsilon."""
    epsilon_high: float | None = None
    """Upper clipping bound 1 + epsilon_high (DAPO's clip-higher; default: epsilon)."""
    delta: float | None = None
    """Also cap the ratio at delta in the unclipped term (two-sided clipping); must be > 1 + epsilon_high."""
    importance_sampling_level: str = "token"
    """Importance ratio per token, or per sequence from the mean token log-ratio (GSPO)."""
    num_iterations: int = 1
    """Optimizer steps on each rollout (μ of the GRPO paper); > 1 computes old-policy log-probs."""
    top_entropy_quantile: float = 1.0
    """Train only on the completion tokens in this top fraction of entropy (0.2 = the "80/20" paper)."""


@dataclass
class GRPOConfig(GRPOArgs, RewardArgs, GenerationArgs, TrainArgs, DataArgs, ModelArgs):
    """Configuration of `prefalign grpo`."""

    learning_rate: float = 1e-6
    """Peak learning rate of AdamW (TRL's GRPO default)."""
    per_device_train_batch_size: int = 8
    """Completions (prompts x generations) per micro-batch on each device."""
    per_device_eval_batch_size: int = 8
    """Prompts per evaluation batch (one sampled completion each)."""
    max_prompt_length: int | None = 512
    """Longest prompt in tokens; longer prompts are cut per --truncation_mode."""
    max_completion_length: int | None = 256
    """Most tokens sampled per completion."""


def check_grpo_config(cfg: GRPOConfig) -> None:
    check_rl_config(cfg)
    g, per_step = cfg.num_generations, cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    if g < 2:
        raise PrefalignError(f"must be at least 2 (advantages compare completions of a prompt), got {g}",
                             "--num_generations")
    if per_step % g:
        raise PrefalignError(f"per_device_train_batch_size x gradient_accumulation_steps = {per_step} completions "
                             f"per step must be a multiple of num_generations = {g}", "--num_generations")
    choices = {"loss_type": GRPO_NORMALIZERS, "scale_rewards": SCALE_REWARDS,
               "importance_sampling_level": ("token", "sequence")}
    for flag, allowed in choices.items():
        if getattr(cfg, flag) not in allowed:
            raise PrefalignError(f"must be one of {', '.join(allowed)}, got {getattr(cfg, flag)!r}", f"--{flag}")
    if cfg.num_iterations < 1:
        raise PrefalignError(f"must be at least 1, got {cfg.num_iterations}", "--num_iterations")
    if not 0 < cfg.top_entropy_quantile <= 1:
        raise PrefalignError(f"must be in (0, 1], got {cfg.top_entropy_quantile}", "--top_entropy_quantile")
    high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    if cfg.delta is not None and cfg.delta <= 1 + high:
        raise PrefalignError(f"must be > 1 + epsilon_high = {1 + high}, got {cfg.delta}", "--delta")


# ----------------------------------------------------------------------------------------------- the stage

AdvantageFn = Callable[[Tensor, Tensor | None, Tensor | None, Tensor], tuple[Tensor, dict[str, float]]]


def grpo_advantages(cfg: GRPOConfig) -> AdvantageFn:
    def advantages(rewards: Tensor, sampling_logps: Tensor | None, ref_logps: Tensor | None,
                   mask: Tensor) -> tuple[Tensor, dict[str, float]]:
        adv, metrics = group_advantages(rewards, cfg.num_generations, scale_rewards=cfg.scale_rewards)
        return adv, {k: float(v) for k, v in metrics.items()}

    return advantages


class GRPOStage(RolloutStage):
    """Group-relative policy optimisation for the loop (see train.loop.Stage); RLOO passes its own advantages."""

    progress_keys = {"reward": "reward", "kl": "kl", "completions/mean_length": "len"}

    def __init__(self, cfg: GRPOConfig, model: torch.nn.Module, train: RolloutSampler, eval_: RolloutSampler | None,
                 reward_fns: list, reference: Any, num_processes: int = 1, advantage_fn: AdvantageFn | None = None,
                 kl_in_reward: bool = False) -> None:
        self.cfg, self.model, self.reward_fns, self.reference = cfg, model, reward_fns, reference
        self.samplers = {"train": train, "eval": eval_}
        self.advantage_fn = advantage_fn or grpo_advantages(cfg)
        self.kl_in_reward = kl_in_reward  # RLOO: beta·KL is subtracted from the reward, not added to the loss
        self.rows_per_rollout = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * num_processes
        self.per_token = cfg.loss_type in ("dapo", "bnpo")
        self.schedule = RolloutSchedule(len(train.examples), self.rows_per_rollout // cfg.num_generations, cfg.seed,
                                        self._micro_batches, self._sample_and_score)

    # ---------------------------------------------------------------- data
    def _micro_batches(self, epoch: int, r: int) -> list[tuple[int, ...]]:
        b = self.cfg.per_device_train_batch_size
        one_pass = [tuple(range(k, k + b)) for k in range(0, self.rows_per_rollout, b)]
        return one_pass * self.cfg.num_iterations

    # ---------------------------------------------------------------- rollouts
    def _sample_and_score(self, epoch: int, r: int) -> dict[str, Any]:
        cfg = self.cfg
        s, batch, rewards, metrics, loss_mask = self.sample_rollout(self.model, epoch, r, cfg.num_generations)
        device = s.token_mask.device
        chunk = cfg.per_device_train_batch_size
        sampling = None
        if cfg.num_iterations > 1 or (self.kl_in_reward and cfg.beta != 0):
            sampling = rollout_logps(self.model, batch, chunk, cfg.temperature)
        ref = None
        if cfg.beta != 0:
            model, weights = reference_weights(self.reference)
            ref = rollout_logps(model, batch, chunk, cfg.temperature, weights)
        advantages, adv_metrics = self.advantage_fn(rewards.to(device), sampling, ref, s.token_mask)
        tensors = {**batch, "loss_mask": loss_mask, "advantages": advantages}
        if sampling is not None and cfg.num_iterations > 1:
            tensors["old_logps"] = sampling
        if ref is not None and not self.kl_in_reward:
            tensors["ref_logps"] = ref
        metrics.update(adv_metrics)
        return self.finish_rollout(s, tensors, loss_mask, metrics)

    # ---------------------------------------------------------------- math
    def step(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[Tensor, MetricSums]:
        cfg = self.cfg
        out = completion_logps(model, batch, with_entropy=True, temperature=cfg.temperature)
        mask = batch["loss_mask"]  # (b, Tc)
        loss, m = grpo_loss(
            out.token_logps, batch["advantages"], mask, old_per_token_logps=batch.get("old_logps"),
            ref_per_token_logps=batch.get("ref_logps"), entropies=out.entropy,
            loss_type="bnpo" if self.per_token else cfg.loss_type, beta=0.0 if self.kl_in_reward else cfg.beta,
            epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, delta=cfg.delta,
            importance_sampling_level=cfg.importance_sampling_level, top_entropy_quantile=cfg.top_entropy_quantile,
            max_completion_length=cfg.max_completion_length,
        )
        tokens_t = mask.sum().to(loss.dtype)
        # undo the micro-batch normalisation: the loop divides by the step's weight
        loss_sum = loss * (tokens_t if self.per_token else float(mask.size(0)))
        host = to_host({"tokens": tokens_t, "loss": loss_sum, **m})
        tokens = host.pop("tokens")
        metrics: MetricSums = {"loss": (host.pop("loss"), tokens if self.per_token else float(mask.size(0)))}
        metrics.update({k: (v * tokens, tokens) for k, v in host.items()})
        metrics.update({k: (v, 1.0) for k, v in batch["rollout_metrics"].items()})
        return loss_sum, metrics

    def eval_step(self, model: torch.nn.Module, batch: dict[str, Any]) -> MetricSums:
        return eval_rewards(self.samplers["eval"], model, batch["indices"], self.reward_fns, self.cfg)


# ----------------------------------------------------------------------------------------------- the driver


def train_grpo(cfg: GRPOConfig, advantage_fn: AdvantageFn | None = None, kl_in_reward: bool = False,
               run_name: str = "grpo", check: Callable[[Any], None] | None = None) -> Any:
    """GRPO end to end (RLOO with its advantages): prompts → rollouts → loop → final model in cfg.output_dir."""
    from prefalign.data.templates import resolve_chat_template
    from prefalign.model.load import load_policy, load_tokenizer
    from prefalign.model.reference import build_reference
    from prefalign.train.run import make_accelerator, train_and_save

    (check or check_grpo_config)(cfg)
    accelerator = make_accelerator(cfg)
    tokenizer = load_tokenizer(cfg)
    resolve_chat_template(tokenizer, cfg.chat_template)
    train, eval_ = load_rl_data(cfg, tokenizer, accelerator)
    reward_fns = load_reward_functions(cfg, accelerator.device)
    model = load_policy(cfg, gradient_checkpointing=cfg.gradient_checkpointing).to(accelerator.device)
    if cfg.disable_dropout:
        disable_dropout(model)
    reference = build_reference(model, cfg, cfg.beta != 0)
    stage = GRPOStage(cfg, model, train, eval_, reward_fns, reference, accelerator.num_processes, advantage_fn,
                      kl_in_reward)
    return train_and_save(stage, model, tokenizer, cfg, accelerator, run_name)


CONFIG = GRPOConfig


def run_command(cfg: GRPOConfig) -> None:
    """`prefalign grpo`."""
    print_summary("grpo", train_grpo(cfg), cfg.output_dir, ("reward", "reward_std", "kl", "completions/mean_length"))
