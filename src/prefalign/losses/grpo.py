"""GRPO and its variants, and RLOO's advantages, as pure functions of tensors; the KL estimators and masked
statistics they use are in `losses.stats`, PPO's objective in `losses.ppo`.

Nothing here touches a model, a device, a process group or a flag: the stages compute log-probs and rewards,
validate the options (naming the flag at fault) and call these functions, which raise ValueError on options a
stage should never pass. Hyperparameters use TRL's names (`beta`, `epsilon`, `epsilon_high`, `delta`,
`loss_type`, `scale_rewards`, ...) and the formulas follow TRL's GRPOTrainer and RLOOTrainer.

Shapes: B completions (= prompts x num_generations, grouped so that rows g*G .. g*G+G-1 share a prompt),
T completion tokens. Masks are 1 on real completion tokens (up to and including EOS), 0 on padding.
Metrics are detached 0-dim tensors named as TRL logs them; the loop decides how to average them over steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from prefalign.losses.stats import kl_divergence, masked_mean, nanstd

# ------------------------------------------------------------------------------------------------ advantages

SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(
    rewards: Tensor, num_generations: int, *, scale_rewards: str | bool = "group", eps: float = 1e-4
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO advantages: reward minus its group's mean, divided by a std + `eps`. (B,) -> (B,).

    scale_rewards: "group" divides by the group's std (DeepSeekMath), "batch" by the std of the whole batch
    (the mean is still the group's), "none" does not divide (Dr. GRPO). True/False mean "group"/"none" (TRL's
    aliases). Stds are unbiased. A nan reward marks an unscorable completion (every reward function returned
    None): it is left out of its group's mean and std, and its advantage is 0 — as is every advantage of a group
    whose std cannot be computed (fewer than 2 scorable members).
    Metrics (TRL's): reward (mean), reward_std (std over the batch), frac_reward_zero_std.
    """
    scale = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)  # type: ignore[call-overload]
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {list(SCALE_REWARDS)}, got {scale_rewards!r}")
    rewards = rewards.float()
    grouped = rewards.view(-1, num_generations)  # (P, G)
    advantages = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).view(-1)  # (B,)
    if scale == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    elif num_generations > 1:  # "group", and "none" for the zero-std metric
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)  # (B,)
    else:
        std = torch.zeros_like(rewards)
    if scale != "none":
        advantages = advantages / (std + eps)
    metrics = {
        "reward": torch.nanmean(rewards).detach(),
        "reward_std": nanstd(rewards).detach() if rewards.numel() > 1 else torch.zeros(()),
        "frac_reward_zero_std": torch.isclose(std, torch.zeros_like(std)).float().mean(),
    }
    return torch.nan_to_num(advantages, nan=0.0), metrics


def rloo_advantages(
    rewards: Tensor, num_generations: int, *, normalize_advantages: bool = False, eps: float = 1e-4
) -> Tensor:
    """REINFORCE leave-one-out: r_i - mean of the other rewards of its group. (B,) -> (B,).

    Equivalent to G/(G-1) x (r_i - group mean). nan rewards (unscorable) are left out of their siblings'
    baselines and get advantage 0, as does a lone scorable member; with one generation every advantage is 0.
    `normalize_advantages` standardises over the batch, (A - mean) / (std + eps), as TRL's RLOOTrainer.
    """
    rewards = rewards.float()
    if num_generations < 2:
        return torch.zeros_like(rewards)
    grouped = rewards.view(-1, num_generations)  # (P, G)
    scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)  # (P, 1)
    baseline = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (scorable - 1)  # (P, G)
    advantages = (grouped - baseline).view(-1)
    if normalize_advantages:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + eps)
    return torch.nan_to_num(advantages, nan=0.0, posinf=0.0, neginf=0.0)


def kl_penalized_rewards(
    rewards: Tensor, logps: Tensor, ref_logps: Tensor, completion_mask: Tensor, *, beta: float
) -> Tensor:
    """RLOO's KL-in-reward: r - beta x sum over real tokens of k1 = (logp - ref). (B,), (B, T) x3 -> (B,).

    Unlike GRPO's k3 in the loss, this per-token estimate can be negative (the RLOO paper's choice, and TRL's);
    `logps` are the sampling policy's (no grad).
    """
    mask = completion_mask.to(logps.dtype)
    return rewards - beta * ((logps - ref_logps) * mask).sum(-1)


# ----------------------------------------------------------------------------------------------- GRPO loss


def high_entropy_mask(entropies: Tensor, mask: Tensor, top_entropy_quantile: float) -> Tensor:
    """Boolean (B, T): real tokens whose entropy is in the top `top_entropy_quantile` fraction of the batch.

    The threshold is the (1 - q) quantile (linear interpolation) of the entropies of real tokens; a token is kept
    when its entropy >= threshold, so q = 1 keeps every token and q = 0.2 keeps the top 20 % ("80/20" paper).
    """
    real = mask.bool()
    values = entropies[real].float()
    if values.numel() == 0:
        return torch.zeros_like(real)
    threshold = torch.quantile(values, 1.0 - top_entropy_quantile)
    return (entropies >= threshold) & real


def _seq_mean_then_mean(per_token: Tensor, mask: Tensor, **_: object) -> Tensor:
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def _token_mean(per_token: Tensor, mask: Tensor, **_: object) -> Tensor:
    return masked_mean(per_token, mask)


def _fixed_length(per_token: Tensor, mask: Tensor, *, max_completion_length: int | None, **_: object) -> Tensor:
    if max_completion_length is None:
        raise ValueError("loss_type dr_grpo divides by max_completion_length, which is None")
    return (per_token * mask).sum() / (per_token.size(0) * max_completion_length)


def _global_tokens(
    per_token: Tensor, mask: Tensor, *, num_items_in_batch: Tensor | int | None, num_processes: int, **_: object
) -> Tensor:
    # Divide by the real tokens of the whole accumulated global batch (per process, since DDP averages
    # gradients over processes): every token weighs the same however the batch is split into micro-batches.
    total = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=mask.dtype, device=mask.device)
    return (per_token * mask).sum() / (total.clamp(min=1.0) / num_processes)


# loss_type -> how the (B, T) per-token loss becomes a scalar. The first three are per micro-batch (the loop
# then averages over gradient-accumulation steps, as TRL divides by them); dapo is already global.
GRPO_NORMALIZERS: dict[str, Callable[..., Tensor]] = {
    "grpo": _seq_mean_then_mean,
    "bnpo": _token_mean,
    "dr_grpo": _fixed_length,
    "dapo": _global_tokens,
}


def _importance_log_weights(log_ratio: Tensor, mask: Tensor, level: str) -> Tensor:
    if level == "token":
        return log_ratio  # (B, T)
    if level == "sequence":  # GSPO: one ratio per sequence, from the mean token log-ratio
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (B, 1)
    raise ValueError(f"importance_sampling_level must be token or sequence, got {level!r}")


def grpo_loss(
    per_token_logps: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    old_per_token_logps: Tensor | None = None,
    ref_per_token_logps: Tensor | None = None,
    entropies: Tensor | None = None,
    loss_type: str = "dapo",
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    top_entropy_quantile: float = 1.0,
    use_bias_correction_kl: bool = False,
    max_completion_length: int | None = None,
    num_items_in_batch: Tensor | int | None = None,
    num_processes: int = 1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped-surrogate GRPO loss of one micro-batch, with TRL's semantics.

    per_token_logps (B, T) with grad; advantages (B,) or (B, T); completion_mask (B, T);
    old_per_token_logps (B, T) from the sampling policy (None: single on-policy step, ratio = exp(logp - logp.detach())
    = 1 with the policy gradient); ref_per_token_logps (B, T), needed when beta != 0; entropies (B, T), needed for
    top_entropy_quantile < 1 and for the entropy metric.
    Ratio r = exp(log-ratio) per token, or per sequence (GSPO) from the mean token log-ratio. Per token:
    -min(r·A, clip(r, 1-epsilon, 1+epsilon_high)·A), where r is first capped at `delta` when given (two-sided
    clipping), times the entropy mask, plus beta·k3 KL. `loss_type` normalises it (see GRPO_NORMALIZERS);
    `num_items_in_batch` (dapo) is the real-token count of the global accumulated batch.
    """
    if loss_type not in GRPO_NORMALIZERS:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {sorted(GRPO_NORMALIZERS)}")
    mask = completion_mask.to(per_token_logps.dtype)  # (B, T)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    # Zero the log-ratio at padding first: whatever sits there must not overflow exp() into inf·0 = nan.
    log_ratio = (per_token_logps - old) * mask
    coef_1 = torch.exp(_importance_log_weights(log_ratio, mask, importance_sampling_level))
    eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high

    per_token_kl = None
    if beta != 0.0:
        if ref_per_token_logps is None:
            raise ValueError("grpo_loss: beta != 0 needs ref_per_token_logps")
        per_token_kl = kl_divergence(per_token_logps * mask, ref_per_token_logps * mask, "k3")  # (B, T)
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)  # (B, T), or (B, 1) at sequence level
    if top_entropy_quantile < 1.0:
        if entropies is None:
            raise ValueError("grpo_loss: top_entropy_quantile < 1 needs entropies")
        per_token_loss = per_token_loss * high_entropy_mask(entropies, mask, top_entropy_quantile)
    if per_token_kl is not None:
        per_token_loss = per_token_loss + beta * per_token_kl
    per_token_loss = per_token_loss.expand_as(mask)

    loss = GRPO_NORMALIZERS[loss_type](
        per_token_loss, mask, max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch, num_processes=num_processes,
    )
    return loss, _grpo_metrics(coef_1, adv, mask, eps_low, eps_high, per_token_kl, entropies)


def _grpo_metrics(
    coef_1: Tensor, adv: Tensor, mask: Tensor, eps_low: float, eps_high: float,
    per_token_kl: Tensor | None, entropies: Tensor | None,
) -> dict[str, Tensor]:
    def batch_mean(x: Tensor) -> Tensor:
        # A sequence-level quantity (B, 1) counts once per sequence; a token-level one once per real token.
        return x.mean() if x.shape[1] == 1 else masked_mean(x, mask)

    with torch.no_grad():
        low = (coef_1 < 1 - eps_low) & (adv < 0)
        high = (coef_1 > 1 + eps_high) & (adv > 0)
        metrics = {
            "clip_ratio/low_mean": batch_mean(low.float()),
            "clip_ratio/high_mean": batch_mean(high.float()),
            "clip_ratio/region_mean": batch_mean((low | high).float()),
        }
        if per_token_kl is not None:
            metrics["kl"] = batch_mean(per_token_kl.float())
        if entropies is not None:
            metrics["entropy"] = masked_mean(entropies.float(), mask)
    return metrics
