"""RLOO (`prefalign rloo`): a leave-one-out baseline with the KL in the reward, an algorithm of the shared rollout
stage with GRPO's micro-batches and clipped loss.

Two differences from GRPO, both in the advantages:
- the KL to the reference is a penalty on the reward, not a loss term: r_i - beta x sum_t (logp_t - ref_t),
  with the sampling policy's log-probs (k1, the RLOO paper's and TRL's estimator);
- the baseline of completion i is the mean reward of the other completions of its prompt, with no division by a
  std (optionally `--normalize_advantages` standardises over the batch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from prefalign.config import RLOOConfig
from prefalign.losses.grpo import kl_penalized_rewards, rloo_advantages
from prefalign.losses.stats import nanstd
from prefalign.model.reference import Reference
from prefalign.rollout.sampling import Sampled, rollout_logps
from prefalign.stages.grpo import check_grpo_config, clipped_surrogate
from prefalign.stages.rollout import RepeatedPasses, train_online
from prefalign.train.loop import LoopResult
from prefalign.train.setup import Session


class RLOO:
    """Leave-one-out advantages of KL-penalised rewards; an `Algorithm` of `stages.rollout`."""

    progress_keys = {"reward": "reward", "kl": "kl", "completions/mean_length": "len"}
    eval_reward_name = "reward"

    def __init__(self, cfg: RLOOConfig, policy: nn.Module, reference: Reference | None) -> None:
        self.cfg, self.policy, self.model, self.reference = cfg, policy, policy, reference
        self.num_generations = cfg.num_generations
        self.per_token = cfg.loss_type in ("dapo", "bnpo")
        self.batching = RepeatedPasses(cfg.per_device_train_batch_size, cfg.num_iterations)

    def prepare(self, batch: dict[str, Tensor], rewards: Tensor, sampled: Sampled,
                loss_mask: Tensor) -> tuple[dict[str, Tensor], dict[str, float]]:
        cfg, chunk = self.cfg, self.cfg.per_device_train_batch_size
        kept: dict[str, Tensor] = {}
        sampling = ref = None
        if cfg.num_iterations > 1 or cfg.beta != 0:
            sampling = rollout_logps(self.policy, batch, chunk, cfg.temperature)
        if cfg.num_iterations > 1:
            kept["old_logps"] = sampling
        if cfg.beta != 0:
            ref = rollout_logps(self.reference.model, batch, chunk, cfg.temperature, self.reference.weights)
        kept["advantages"], metrics = rloo_advantage_fn(cfg)(rewards, sampling, ref, sampled.token_mask)
        return kept, metrics

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        return clipped_surrogate(self.cfg, model, batch, beta=0.0)  # the KL is in the reward


def rloo_advantage_fn(cfg: RLOOConfig) -> Callable[..., tuple[Tensor, dict[str, float]]]:
    """(rewards, sampling log-probs, reference log-probs, mask) -> advantages with the KL in the reward."""

    def advantages(rewards: Tensor, sampling_logps: Tensor | None, ref_logps: Tensor | None,
                   mask: Tensor) -> tuple[Tensor, dict[str, float]]:
        metrics = {"reward": float(rewards.nanmean()), "reward_std": float(nanstd(rewards))}
        if cfg.beta != 0 and sampling_logps is not None and ref_logps is not None:
            kl = ((sampling_logps - ref_logps) * mask).sum(1)  # (N,) sequence k1
            metrics["kl"] = float((kl / mask.sum(1).clamp(min=1)).mean())  # per token, comparable to GRPO's
            rewards = kl_penalized_rewards(rewards, sampling_logps, ref_logps, mask, beta=cfg.beta)
        adv = rloo_advantages(rewards, cfg.num_generations, normalize_advantages=cfg.normalize_advantages)
        return adv, metrics

    return advantages


def train_rloo(cfg: RLOOConfig) -> LoopResult:
    """RLOO end to end: prompts → rollouts → loop → final model in cfg.output_dir."""
    check_grpo_config(cfg)

    def make(policy: nn.Module, reference: Reference | None, session: Session) -> RLOO:
        return RLOO(cfg, policy, reference)

    return train_online(cfg, make, "rloo", needs_reference=cfg.beta != 0)
