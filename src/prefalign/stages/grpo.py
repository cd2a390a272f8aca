"""GRPO (`prefalign grpo`): the group-relative algorithm composed into the shared rollout stage (`stages.rollout`).

One optimizer step = one rollout: B x A x processes completions (`--per_device_train_batch_size` counts
completions, as in TRL), i.e. that many / `--num_generations` prompts, each sampled G times with the KV cache.
The rollout is scored by the reward functions, turned into group advantages, and kept for `--num_iterations`
optimizer steps; its old-policy log-probs are computed once when they are needed (num_iterations > 1), the
reference's once when `--beta` != 0. Rollouts are seeded by (seed, epoch, rollout), so a run is reproducible and
resumable (see `rollout.schedule`).

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

from typing import Any

from torch import Tensor, nn

from prefalign.config import GRPOConfig
from prefalign.errors import PrefalignError
from prefalign.losses.grpo import GRPO_NORMALIZERS, SCALE_REWARDS, group_advantages, grpo_loss
from prefalign.model.logprobs import completion_logps
from prefalign.model.reference import Reference
from prefalign.rollout.sampling import Sampled, rollout_logps
from prefalign.stages.rollout import RepeatedPasses, check_rl_config, train_online
from prefalign.train.loop import LoopResult
from prefalign.train.setup import Session


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


class GRPO:
    """Group advantages and the clipped surrogate (see the module docstring); an `Algorithm` of `stages.rollout`."""

    progress_keys = {"reward": "reward", "kl": "kl", "completions/mean_length": "len"}
    eval_reward_name = "reward"

    def __init__(self, cfg: GRPOConfig, policy: nn.Module, reference: Reference | None) -> None:
        self.cfg, self.policy, self.model, self.reference = cfg, policy, policy, reference
        self.num_generations = cfg.num_generations
        self.per_token = cfg.loss_type in ("dapo", "bnpo")
        self.batching = RepeatedPasses(cfg.per_device_train_batch_size, cfg.num_iterations)

    def prepare(self, batch: dict[str, Tensor], rewards: Tensor, sampled: Sampled,
                loss_mask: Tensor) -> tuple[dict[str, Tensor], dict[str, float]]:
        cfg, chunk = self.cfg, self.cfg.per_device_train_batch_size
        kept: dict[str, Tensor] = {}
        if cfg.num_iterations > 1:  # later steps on this rollout are off-policy: keep the sampler's log-probs
            kept["old_logps"] = rollout_logps(self.policy, batch, chunk, cfg.temperature)
        if cfg.beta != 0:
            kept["ref_logps"] = rollout_logps(self.reference.model, batch, chunk, cfg.temperature,
                                              self.reference.weights)
        advantages, metrics = group_advantages(rewards, cfg.num_generations, scale_rewards=cfg.scale_rewards)
        kept["advantages"] = advantages
        return kept, {k: float(v) for k, v in metrics.items()}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        return clipped_surrogate(self.cfg, model, batch, beta=self.cfg.beta)


def clipped_surrogate(cfg: GRPOConfig, model: nn.Module, batch: dict[str, Any],
                      beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped-surrogate loss of one micro-batch (`losses.grpo.grpo_loss`) at the sampling temperature; the
    per-token normalisations are token means here, the loop dividing by the step's tokens."""
    out = completion_logps(model, batch, with_entropy=True, temperature=cfg.temperature)
    per_token = cfg.loss_type in ("dapo", "bnpo")
    return grpo_loss(
        out.token_logps, batch["advantages"], batch["loss_mask"], old_per_token_logps=batch.get("old_logps"),
        ref_per_token_logps=batch.get("ref_logps"), entropies=out.entropy,
        loss_type="bnpo" if per_token else cfg.loss_type, beta=beta,
        epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, delta=cfg.delta,
        importance_sampling_level=cfg.importance_sampling_level, top_entropy_quantile=cfg.top_entropy_quantile,
        max_completion_length=cfg.max_completion_length,
    )


def train_grpo(cfg: GRPOConfig) -> LoopResult:
    """GRPO end to end: prompts → rollouts → loop → final model in cfg.output_dir."""
    check_grpo_config(cfg)

    def make(policy: nn.Module, reference: Reference | None, session: Session) -> GRPO:
        return GRPO(cfg, policy, reference)

    return train_online(cfg, make, "grpo", needs_reference=cfg.beta != 0)
