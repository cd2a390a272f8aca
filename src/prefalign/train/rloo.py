"""RLOO (`prefalign rloo`): GRPO's rollouts, loop and clipped loss with a leave-one-out baseline.

Two differences from GRPO, both in the advantages (everything else is `train.grpo` and `train.rollout`):
- the KL to the reference is a penalty on the reward, not a loss term: r_i - beta x sum_t (logp_t - ref_t),
  with the sampling policy's log-probs (k1, the RLOO paper's and TRL's estimator);
- the baseline of completion i is the mean reward of the other completions of its prompt, with no division by a
  std (optionally `--normalize_advantages` standardises over the batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from prefalign.losses.policy import kl_penalized_rewards, nanstd, rloo_advantages
from prefalign.train.grpo import AdvantageFn, GRPOConfig, check_grpo_config, train_grpo
from prefalign.train.run import print_summary


@dataclass
class RLOOConfig(GRPOConfig):
    """Configuration of `prefalign rloo`."""

    num_generations: int = 2
    """Completions sampled per prompt (the leave-one-out group; TRL's RLOO default)."""
    beta: float = 0.05
    """Weight of the KL penalty subtracted from each completion's reward; 0 loads no reference."""
    normalize_advantages: bool = False
    """Standardise the leave-one-out advantages over the batch."""


def rloo_advantage_fn(cfg: RLOOConfig) -> AdvantageFn:
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


CONFIG = RLOOConfig


def run_command(cfg: RLOOConfig) -> Any:
    """`prefalign rloo`."""
    result = train_grpo(cfg, rloo_advantage_fn(cfg), kl_in_reward=True, run_name="rloo", check=check_grpo_config)
    print_summary("rloo", result, cfg.output_dir, ("reward", "reward_std", "kl", "completions/mean_length"))
