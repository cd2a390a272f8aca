"""GRPO (`prefalign grpo`): the group-relative algorithm composed into the shared rollout stage (`stages.rollout`).

One optimizer step = one rollout: B x A x processes completions (`--per_device_train_batch_size` counts
completions, as in TRL), i.e. that many / `--num_generations` prompts, each prefilled once and sampled G times
with the KV cache. The rollout is scored by the reward functions, turned into group advantages, and kept for
`--num_iterations` optimizer steps; its old-policy log-probs are computed once when they are needed
(num_iterations > 1), the reference's once when `--beta` != 0. Every forward (policy, old policy, reference) runs a
micro-batch's groups in the shared-prompt packed layout: each prompt once, its completions attending to it
(`--share_prompt`, on by default; padded rows where the model does not allow it). Rollouts are seeded by (seed,
epoch, rollout), so a run is reproducible and resumable (see `rollout.schedule`).

Loss types are TRL 1.16's eight (`losses.grpo.GRPO_LOSS_TYPES`): the clipped surrogate with the grpo, bnpo,
dr_grpo, dapo and luspo reductions, and cispo, sapo and vespo. The k3 KL term is importance-weighted
(`--use_bias_correction_kl`, TRL's default).

Loss normalisation. The loop divides the summed micro-batch losses by the summed `batch_weight` of the step, so
`step` returns sums and batch B x A equals A·B x 1 for every loss type:
- grpo, sapo: sum over completions of (token mean of the completion) / completions in the step (TRL's value).
- luspo:      sum over completions of (token sum of the completion) / completions in the step (TRL's value).
- dr_grpo:    sum over tokens / max_completion_length / completions in the step (TRL's value).
- dapo, cispo, vespo: sum over tokens / real tokens in the step (TRL's value: num_items_in_batch).
- bnpo:       the same token mean over the whole step. TRL takes the token mean of each micro-batch and averages
              those, which depends on how the step is split; the two agree at gradient_accumulation_steps=1 on one
              process, and bnpo equals dapo here.
Log-probs are those of the temperature-scaled logits (TRL's choice), so the policy optimised is the sampler.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from prefalign.config import GRPOConfig
from prefalign.errors import PrefalignError
from prefalign.losses.grpo import (
    GRPO_LOSS_TYPES,
    SCALE_REWARDS,
    PolicyLossParams,
    group_advantages,
    grpo_loss,
    is_token_mean,
)
from prefalign.model.logprobs import completion_logps
from prefalign.model.reference import Reference
from prefalign.rollout.sampling import CompletionGroups
from prefalign.stages.rollout import (
    RepeatedPasses,
    ScoredRollout,
    check_group_config,
    check_rl_config,
    train_online,
)
from prefalign.train.loop import LoopResult
from prefalign.train.setup import Session


def check_grpo_config(cfg: GRPOConfig) -> None:
    check_rl_config(cfg)
    check_group_config(cfg)
    choices = {"loss_type": GRPO_LOSS_TYPES, "scale_rewards": SCALE_REWARDS,
               "importance_sampling_level": ("token", "sequence")}
    for flag, allowed in choices.items():
        if getattr(cfg, flag) not in allowed:
            raise PrefalignError(f"must be one of {', '.join(allowed)}, got {getattr(cfg, flag)!r}", f"--{flag}")
    if not 0 < cfg.top_entropy_quantile <= 1:
        raise PrefalignError(f"must be in (0, 1], got {cfg.top_entropy_quantile}", "--top_entropy_quantile")
    high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    if cfg.delta is not None and cfg.delta <= 1 + high:
        raise PrefalignError(f"must be > 1 + epsilon_high = {1 + high}, got {cfg.delta}", "--delta")
    for flag in ("sapo_temperature_pos", "sapo_temperature_neg"):
        if getattr(cfg, flag) <= 0:
            raise PrefalignError(f"must be > 0, got {getattr(cfg, flag)}", f"--{flag}")


def policy_loss_params(cfg: GRPOConfig) -> PolicyLossParams:
    return PolicyLossParams(
        epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, delta=cfg.delta,
        sapo_temperature_pos=cfg.sapo_temperature_pos, sapo_temperature_neg=cfg.sapo_temperature_neg,
        vespo_k_pos=cfg.vespo_k_pos, vespo_lambda_pos=cfg.vespo_lambda_pos, vespo_k_neg=cfg.vespo_k_neg,
        vespo_lambda_neg=cfg.vespo_lambda_neg,
    )


class GRPO:
    """Group advantages and the GRPO-family loss (see the module docstring); an `Algorithm` of `stages.rollout`."""

    progress_keys = {"reward": "reward", "kl": "kl", "completions/mean_length": "len"}
    eval_reward_name = "reward"
    shares_prompts = True

    def __init__(self, cfg: GRPOConfig, policy: nn.Module, reference: Reference | None) -> None:
        self.cfg, self.policy, self.model, self.reference = cfg, policy, policy, reference
        self.num_generations = cfg.num_generations
        self.per_token = is_token_mean(cfg.loss_type)
        self.batching = RepeatedPasses(cfg.per_device_train_batch_size, cfg.num_iterations)
        self.params = policy_loss_params(cfg)

    def forward_passes(self, groups: CompletionGroups, loss_mask: Tensor, packed: bool) -> dict[str, Tensor]:
        cfg, chunk = self.cfg, self.cfg.per_device_train_batch_size
        out: dict[str, Tensor] = {}
        if cfg.num_iterations > 1:  # later steps on this rollout are off-policy: keep the sampler's log-probs
            out["old_logps"] = groups.logps(self.policy, chunk, cfg.temperature, packed)
        if cfg.beta != 0:
            out["ref_logps"] = groups.logps(self.reference.model, chunk, cfg.temperature, packed,
                                            self.reference.weights)
        return out

    def prepare(self, rollout: ScoredRollout) -> tuple[dict[str, Tensor], dict[str, float]]:
        advantages, metrics = group_advantages(rollout.rewards, self.num_generations,
                                               scale_rewards=self.cfg.scale_rewards)
        return {"advantages": advantages, **rollout.passes}, {k: float(v) for k, v in metrics.items()}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one micro-batch at the sampling temperature; token-mean types are means over this
        micro-batch's tokens here, the loop weighing micro-batches by their tokens."""
        cfg = self.cfg
        out = completion_logps(model, batch, with_entropy=True, temperature=cfg.temperature)
        return grpo_loss(
            out.token_logps, batch["advantages"], batch["loss_mask"], loss_type=cfg.loss_type, params=self.params,
            old_per_token_logps=batch.get("old_logps"), ref_per_token_logps=batch.get("ref_logps"),
            entropies=out.entropy, beta=cfg.beta, use_bias_correction_kl=cfg.use_bias_correction_kl,
            importance_sampling_level=cfg.importance_sampling_level, top_entropy_quantile=cfg.top_entropy_quantile,
            max_completion_length=cfg.max_completion_length,
        )


def train_grpo(cfg: GRPOConfig) -> LoopResult:
    """GRPO end to end: prompts → rollouts → loop → final model in cfg.output_dir."""
    check_grpo_config(cfg)

    def make(policy: nn.Module, reference: Reference | None, session: Session) -> GRPO:
        return GRPO(cfg, policy, reference)

    return train_online(cfg, make, "grpo", needs_reference=cfg.beta != 0)
