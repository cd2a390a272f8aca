"""PPO's objective (per-token rewards, GAE, clipped policy + value loss) as pure functions of tensors.

Like `losses.grpo` (and with the KL estimators and masked statistics of `losses.stats`), nothing here touches a model or a
device. The formulas follow TRL's PPOTrainer with TRL's names (`kl_coef`, `cliprange`, `cliprange_value`,
`vf_coef`, ...) and two deliberate differences, both noted where they happen:

- the score goes on the last real completion token and values are masked with the completion mask. TRL adds it
  one position *after* the EOS token and keeps one extra value position; that offset is an artefact of its
  padding bookkeeping, not part of the algorithm.
- `policy/approxkl_avg` is a masked mean over completion tokens (TRL averages over padding too).

Shapes: B completions (one per prompt), T completion tokens. Masks are 1 on real completion tokens (up to and
including EOS), 0 on padding. Metrics are detached 0-dim tensors named as TRL logs them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefalign.losses.stats import kl_divergence, masked_mean, masked_whiten


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last real token of each row. (B, T) -> (B,); 0 for an empty row."""
    # cumsum reaches its maximum first at the last 1; argmax returns the first maximum.
    return mask.long().cumsum(dim=1).argmax(dim=1)


def ppo_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    completion_mask: Tensor,
    *,
    kl_coef: float = 0.05,
    kl_estimator: str = "k1",
    missing_eos_penalty: float | None = None,
    contains_eos: Tensor | None = None,
    whiten_rewards: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO rewards: -kl_coef·KL at every token, plus the score at the last real token. -> (B, T).

    scores (B,) from the reward model; logprobs/ref_logprobs (B, T) of the sampled tokens (no grad);
    `missing_eos_penalty` is subtracted from the score of completions whose `contains_eos` (B,) is False;
    `whiten_rewards` scales (does not shift) the rewards over real tokens. Padding gets reward 0.
    Metrics (TRL's names): objective/kl, objective/entropy, objective/non_score_reward, objective/rlhf_reward,
    objective/scores — sums over tokens, averaged over completions.
    """
    mask = completion_mask.to(logprobs.dtype)  # (B, T)
    scores = scores.float().clone()
    if missing_eos_penalty is not None:
        if contains_eos is None:
            raise ValueError("ppo_rewards: missing_eos_penalty needs contains_eos")
        scores[~contains_eos.bool()] -= missing_eos_penalty
    # k1 = logp - ref; k3 as in kl_divergence. Both measure KL(policy || ref) per sampled token.
    kl = kl_divergence(logprobs * mask, ref_logprobs * mask, kl_estimator)  # (B, T), 0 at padding
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    rewards = rewards * mask
    nsr = non_score_reward.sum(1).mean()
    metrics = {
        "objective/kl": kl.sum(1).mean().detach(),
        "objective/entropy": (-logprobs * mask).sum(1).mean().detach(),
        "objective/non_score_reward": nsr.detach(),
        "objective/rlhf_reward": (scores.mean() + nsr).detach(),
        "objective/scores": scores.mean().detach(),
    }
    return rewards, metrics


def compute_gae(
    rewards: Tensor, values: Tensor, completion_mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95,
    whiten_advantages: bool = True,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over right-padded sequences. (B, T) x3 -> advantages, returns (B, T).

    delta_t = r_t + gamma·V_{t+1} - V_t (V after the last real token is 0, the episode ends there);
    A_t = delta_t + gamma·lam·A_{t+1}; returns = A + V (before whitening, as TRL). With `whiten_advantages`
    the advantages are standardised over real tokens. Padding positions are 0 in both outputs.
    """
    mask = completion_mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    last_gae = torch.zeros_like(values[:, 0])  # (B,)
    reversed_advantages = []
    for t in reversed(range(values.size(1))):
        next_value = values[:, t + 1] if t + 1 < values.size(1) else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        reversed_advantages.append(last_gae)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)  # (B, T)
    returns = (advantages + values) * mask
    if whiten_advantages:
        advantages = masked_whiten(advantages, mask) * mask
    return advantages, returns


def ppo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    completion_mask: Tensor,
    *,
    cliprange: float = 0.2,
    cliprange_value: float = 0.2,
    vf_coef: float = 0.1,
    entropies: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped policy loss + vf_coef x clipped value loss, masked means over real tokens. All inputs (B, T).

    pg = mean max(-A·r, -A·clip(r, 1±cliprange)), r = exp(logprobs - old_logprobs);
    vf = 0.5 · mean max((V - R)^2, (clip(V, V_old ± cliprange_value) - R)^2).
    Metrics (TRL's names): policy/approxkl_avg, policy/clipfrac_avg, loss/policy_avg, loss/value_avg,
    val/clipfrac_avg, val/ratio (and policy/entropy_avg when entropies are given).
    """
    mask = completion_mask.to(logprobs.dtype)
    values_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses1 = (values - returns) ** 2
    vf_losses2 = (values_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)

    log_ratio = (logprobs - old_logprobs) * mask  # padding -> ratio 1, never inf
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    loss = pg_loss + vf_coef * vf_loss

    with torch.no_grad():
        metrics = {
            "policy/approxkl_avg": 0.5 * masked_mean(log_ratio**2, mask),
            "policy/clipfrac_avg": masked_mean((pg_losses2 > pg_losses).float(), mask),
            "loss/policy_avg": pg_loss.detach(),
            "loss/value_avg": vf_loss.detach(),
            "val/clipfrac_avg": masked_mean((vf_losses2 > vf_losses1).float(), mask),
            "val/ratio": masked_mean(ratio, mask),
        }
        if entropies is not None:
            metrics["policy/entropy_avg"] = masked_mean(entropies.float(), mask)
    return loss, metrics
