"""RLOO (`prefalign rloo`): REINFORCE with a leave-one-out baseline and the KL in the reward, an algorithm of the
shared rollout stage, as TRL 1.16's RLOOTrainer computes it.

- Rewards: the weighted reward, clipped to `--reward_clip_range`, minus beta x the sequence's k1 KL to the
  reference, sum_t (logp_t - ref_t) over its loss tokens, with the sampling policy's log-probs (the RLOO paper's
  and TRL's estimator). With `--mask_truncated_completions` a truncated completion has no loss tokens, hence no KL
  penalty (its reward still counts in its siblings' baselines).
- Advantages: a completion's reward minus the mean reward of the other completions of its prompt, no division
  by a std (`--normalize_advantages` standardises over the batch).
- Loss: one importance ratio per completion from its summed token log-probs, rho = exp(sum_t logp_t - old), clipped
  at 1 - epsilon / 1 + epsilon_high, -min(rho A, clip(rho) A), averaged over completions (`losses.grpo.rloo_loss`):
  every token of a completion carries the full sequence weight, so the step does not shrink with answer length.
- Metrics: `kl` is the token mean of k1 over the rollout's loss tokens, `frac_reward_zero_std` the fraction of
  prompts whose clipped, KL-penalised rewards do not vary; the clip ratios are fractions of completions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from prefalign.config import RLOOConfig
from prefalign.errors import PrefalignError
from prefalign.losses.grpo import kl_penalized_rewards, rloo_advantages, rloo_loss
from prefalign.losses.stats import nanstd
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


def check_rloo_config(cfg: RLOOConfig) -> None:
    check_rl_config(cfg)
    check_group_config(cfg)
    clip = cfg.reward_clip_range
    if clip is not None and (len(clip) != 2 or clip[0] > clip[1]):
        raise PrefalignError(f"must be two numbers LOW HIGH with LOW <= HIGH, got {' '.join(map(str, clip))}",
                             "--reward_clip_range")


class RLOO:
    """Leave-one-out advantages of KL-penalised rewards and the sequence-level clipped loss; an `Algorithm` of
    `stages.rollout`."""

    progress_keys = {"reward": "reward", "kl": "kl", "completions/mean_length": "len"}
    eval_reward_name = "reward"
    shares_prompts = True
    per_token = False  # the loss is a mean over completions
    sequence_metrics = frozenset({"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"})

    def __init__(self, cfg: RLOOConfig, policy: nn.Module, reference: Reference | None) -> None:
        self.cfg, self.policy, self.model, self.reference = cfg, policy, policy, reference
        self.num_generations = cfg.num_generations
        self.batching = RepeatedPasses(cfg.per_device_train_batch_size, cfg.num_iterations)

    def forward_passes(self, groups: CompletionGroups, loss_mask: Tensor, packed: bool) -> dict[str, Tensor]:
        cfg, chunk = self.cfg, self.cfg.per_device_train_batch_size
        out: dict[str, Tensor] = {}
        if cfg.num_iterations > 1 or cfg.beta != 0:
            out["sampling_logps"] = groups.logps(self.policy, chunk, cfg.temperature, packed)
        if cfg.beta != 0:
            out["ref_logps"] = groups.logps(self.reference.model, chunk, cfg.temperature, packed,
                                            self.reference.weights)
        return out

    def prepare(self, rollout: ScoredRollout) -> tuple[dict[str, Tensor], dict[str, float]]:
        cfg, mask = self.cfg, rollout.loss_mask.float()  # (N, Tc)
        raw = rollout.rewards.float()  # (N,)
        metrics = {"reward": float(raw.nanmean()), "reward_std": float(nanstd(raw))}
        rewards = raw if cfg.reward_clip_range is None else raw.clamp(*cfg.reward_clip_range)
        kept: dict[str, Tensor] = {}
        if cfg.beta != 0:
            k1 = (rollout.passes["sampling_logps"] - rollout.passes["ref_logps"]) * mask  # (N, Tc)
            metrics["kl"] = float(k1.sum() / mask.sum().clamp(min=1.0))  # token-weighted, as TRL logs it
            rewards = kl_penalized_rewards(rewards, rollout.passes["sampling_logps"], rollout.passes["ref_logps"],
                                           mask, beta=cfg.beta)
        group_std = nanstd(rewards.view(-1, self.num_generations), dim=1)  # (P,)
        metrics["frac_reward_zero_std"] = float(torch.isclose(group_std, torch.zeros_like(group_std)).float().mean())
        kept["advantages"] = rloo_advantages(rewards, self.num_generations,
                                             normalize_advantages=cfg.normalize_advantages)
        if cfg.num_iterations > 1:  # later steps are off-policy: the sampler's summed log-probs
            kept["old_logps"] = (rollout.passes["sampling_logps"] * mask).sum(-1)  # (N,)
        return kept, metrics

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        out = completion_logps(model, batch, with_entropy=True, temperature=cfg.temperature)
        return rloo_loss(out.token_logps, batch["advantages"], batch["loss_mask"], batch.get("old_logps"),
                         epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, entropies=out.entropy)


def train_rloo(cfg: RLOOConfig) -> LoopResult:
    """RLOO end to end: prompts → rollouts → loop → final model in cfg.output_dir."""
    check_rloo_config(cfg)

    def make(policy: nn.Module, reference: Reference | None, session: Session) -> RLOO:
        return RLOO(cfg, policy, reference)

    return train_online(cfg, make, "rloo", needs_reference=cfg.beta != 0)
