"""GRPO and its variants (TRL 1.16's eight loss types: a surrogate and a normaliser each), RLOO's advantages and
loss, as pure functions of tensors; the KL estimators and masked statistics they use are in `losses.stats`, PPO's
objective in `losses.ppo`.

Nothing here touches a model, a device, a process group or a flag: the stages compute log-probs and rewards,
validate the options (naming the flag at fault) and call these functions, which raise ValueError on options a
stage should never pass. Hyperparameters use TRL's names (`beta`, `epsilon`, `epsilon_high`, `delta`,
`loss_type`, `scale_rewards`, ...) and the formulas follow TRL's GRPOTrainer and RLOOTrainer.

Shapes: B completions (= prompts x num_generations, grouped so that rows g*G .. g*G+G-1 share a prompt),
T completion tokens. Masks are 1 on real completion tokens (up to and including EOS), 0 on padding.
Metrics are detached 0-dim tensors named as TRL logs them; the loop averages them over a step's micro-batches and
processes, except `EXTREME_METRICS`, which it reduces by min / max.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

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


# Metrics that combine over micro-batches and processes by their min / max, not their mean (TRL's names); a
# micro-batch with no value for one reports +inf (min) / -inf (max).
EXTREME_METRICS = {"clip_ratio/low_min": "min", "clip_ratio/high_max": "max"}


@dataclass(frozen=True)
class PolicyLossParams:
    """The hyperparameters of the GRPO surrogates, TRL's names and defaults; each surrogate reads its own."""

    epsilon: float = 0.2  # clipped: lower bound 1 - epsilon
    epsilon_high: float | None = None  # clipped: upper bound 1 + epsilon_high; cispo: the cap itself (None: epsilon)
    delta: float | None = None  # clipped: cap of the unclipped ratio (two-sided clipping)
    sapo_temperature_pos: float = 1.0  # sapo, advantage > 0
    sapo_temperature_neg: float = 1.05  # sapo, advantage <= 0
    vespo_k_pos: float = 2.0  # vespo, advantage >= 0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0  # vespo, advantage < 0
    vespo_lambda_neg: float = 2.0

    @property
    def high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


@dataclass(frozen=True)
class SurrogateInputs:
    """What every surrogate may use. Ratios are (B, T) at token level, (B, 1) at sequence level."""

    logps: Tensor  # (B, T) policy log-probs, with grad, 0 at padding
    log_ratio: Tensor  # (B, T) logps - old, 0 at padding
    ratio: Tensor  # the importance weight exp(log_ratio) (token) or exp(mean log_ratio) (sequence)
    advantages: Tensor  # (B, 1) or (B, T)
    mask: Tensor  # (B, T) float


Surrogate = Callable[[SurrogateInputs, PolicyLossParams], tuple[Tensor, dict[str, Tensor]]]


def _row_fraction(flags: Tensor, mask: Tensor) -> Tensor:
    """Per completion: the fraction of its real tokens flagged (nan for an empty completion), or its own flag."""
    if flags.shape[1] == 1:
        return flags.squeeze(1).float()
    return (flags * mask).sum(-1) / mask.sum(-1)


def _clipped(x: SurrogateInputs, p: PolicyLossParams) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate -min(r·A, clip(r, 1-eps, 1+eps_high)·A), r capped at delta in the first term."""
    clipped = torch.clamp(x.ratio, 1 - p.epsilon, 1 + p.high)
    ratio = x.ratio if p.delta is None else torch.clamp(x.ratio, max=p.delta)
    loss = -torch.min(ratio * x.advantages, clipped * x.advantages)
    with torch.no_grad():  # TRL counts with the delta-capped ratio
        low = (ratio < 1 - p.epsilon) & (x.advantages < 0)
        high = (ratio > 1 + p.high) & (x.advantages > 0)
        metrics = {"clip_ratio/low_mean": _mean(low.float(), x.mask), "clip_ratio/high_mean": _mean(high.float(), x.mask),
                   "clip_ratio/region_mean": _mean((low | high).float(), x.mask),
                   "clip_ratio/low_min": torch.nan_to_num(_row_fraction(low.float(), x.mask), nan=torch.inf).min(),
                   "clip_ratio/high_max": torch.nan_to_num(_row_fraction(high.float(), x.mask), nan=-torch.inf).max()}
    return loss, metrics


def _cispo(x: SurrogateInputs, p: PolicyLossParams) -> tuple[Tensor, dict[str, Tensor]]:
    """MiniMax-M1's CISPO: REINFORCE weighted by the ratio capped at epsilon_high (upper cap only, no gradient)."""
    weight = torch.clamp(x.ratio, max=p.high).detach()
    with torch.no_grad():
        clipped = (x.ratio > p.high) & (x.advantages > 0)
    return -weight * x.advantages * x.logps, {"cispo_clip_ratio": _mean(clipped.float(), x.mask)}


def _sapo(x: SurrogateInputs, p: PolicyLossParams) -> tuple[Tensor, dict[str, Tensor]]:
    """SAPO's soft gate sigma(tau (r - 1)) 4 / tau instead of the hard clip (tau by the advantage's sign)."""
    tau = torch.where(x.advantages > 0, p.sapo_temperature_pos, p.sapo_temperature_neg)
    return -torch.sigmoid(tau * (x.ratio - 1)) * 4 / tau * x.advantages, {}


def _vespo(x: SurrogateInputs, p: PolicyLossParams) -> tuple[Tensor, dict[str, Tensor]]:
    """VESPO: REINFORCE scaled by the gamma weight phi(w) = exp(lambda + k log w - lambda w) of the sequence ratio
    w = exp(sum of token log-ratios), k and lambda by the advantage's sign; phi has no gradient."""
    with torch.no_grad():
        log_floor = math.log(1e-8)
        log_w = torch.clamp((torch.clamp(x.log_ratio, -20.0, 20.0) * x.mask).sum(-1, keepdim=True), log_floor, 20.0)
        nonneg = x.advantages >= 0
        k = torch.where(nonneg, p.vespo_k_pos, p.vespo_k_neg)
        lam = torch.where(nonneg, p.vespo_lambda_pos, p.vespo_lambda_neg).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return -phi * x.advantages * x.logps, {"vespo/phi_seq_mean": _mean(phi, x.mask)}


SURROGATES: dict[str, Surrogate] = {"clipped": _clipped, "cispo": _cispo, "sapo": _sapo, "vespo": _vespo}


def _mean(x: Tensor, mask: Tensor) -> Tensor:
    # A sequence-level quantity (B, 1) counts once per sequence; a token-level one once per real token.
    return x.float().mean() if x.shape[1] == 1 else masked_mean(x.float(), mask)


def _seq_mean_then_mean(per_token: Tensor, mask: Tensor, **_: object) -> Tensor:
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def _seq_sum_then_mean(per_token: Tensor, mask: Tensor, **_: object) -> Tensor:
    return (per_token * mask).sum(-1).mean()


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
    # Without num_items_in_batch, the micro-batch's own tokens (the loop then weighs micro-batches by tokens).
    total = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=mask.dtype, device=mask.device)
    return (per_token * mask).sum() / (total.clamp(min=1.0) / num_processes)


# How the (B, T) per-token loss becomes a scalar. grpo/sapo/dr_grpo/luspo are means over completions, the
# others over tokens; the loop weighs micro-batches by completions or tokens accordingly (`per_token_loss_types`).
GRPO_NORMALIZERS: dict[str, Callable[..., Tensor]] = {
    "sequence_mean": _seq_mean_then_mean,
    "sequence_sum_mean": _seq_sum_then_mean,
    "token_mean": _token_mean,
    "fixed_length": _fixed_length,
    "global_tokens": _global_tokens,
}

# loss_type -> (surrogate, normaliser), TRL 1.16's eight.
GRPO_LOSS_TYPES: dict[str, tuple[str, str]] = {
    "grpo": ("clipped", "sequence_mean"),
    "bnpo": ("clipped", "token_mean"),
    "dr_grpo": ("clipped", "fixed_length"),
    "dapo": ("clipped", "global_tokens"),
    "luspo": ("clipped", "sequence_sum_mean"),
    "cispo": ("cispo", "global_tokens"),
    "sapo": ("sapo", "sequence_mean"),
    "vespo": ("vespo", "global_tokens"),
}


def is_token_mean(loss_type: str) -> bool:
    """Whether `loss_type` averages over tokens (else over completions): how micro-batches weigh in a step."""
    return GRPO_LOSS_TYPES[loss_type][1] in ("token_mean", "global_tokens")


def _importance_log_weights(log_ratio: Tensor, mask: Tensor, level: str) -> Tensor:
    if level == "token":
        return log_ratio  # (B, T)
    if level == "sequence":  # GSPO: one ratio per sequence, from the mean token log-ratio
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (B, 1)
    raise ValueError(f"importance_sampling_level must be token or sequence, got {level!r}")


def _reference_kl(logps: Tensor, ref_logps: Tensor, mask: Tensor, ratio: Tensor | None) -> Tensor:
    """The k3 KL to the reference per token (B, T); with `ratio` (bias correction) the KL of samples drawn from the
    old policy is importance-weighted to the current one."""
    per_token_kl = kl_divergence(logps * mask, ref_logps * mask, "k3")
    return per_token_kl if ratio is None else per_token_kl * ratio


def grpo_loss(
    per_token_logps: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    loss_type: str = "dapo",
    params: PolicyLossParams = PolicyLossParams(),
    old_per_token_logps: Tensor | None = None,
    ref_per_token_logps: Tensor | None = None,
    entropies: Tensor | None = None,
    beta: float = 0.0,
    use_bias_correction_kl: bool = True,
    importance_sampling_level: str = "token",
    top_entropy_quantile: float = 1.0,
    max_completion_length: int | None = None,
    num_items_in_batch: Tensor | int | None = None,
    num_processes: int = 1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO-family loss of one micro-batch, with TRL 1.16's semantics for each `loss_type` (GRPO_LOSS_TYPES).

    per_token_logps (B, T) with grad, 0 at padding; advantages (B,) or (B, T); completion_mask (B, T);
    old_per_token_logps (B, T) from the sampling policy (None: one on-policy step, ratio exp(logp - logp.detach())
    = 1 with the policy gradient); ref_per_token_logps (B, T), needed when beta != 0; entropies (B, T), needed for
    top_entropy_quantile < 1 and for the entropy metric.
    The importance weight is exp(log-ratio) per token, or per sequence (GSPO) from the mean token log-ratio. The
    surrogate's per-token loss is multiplied by the entropy mask, then beta x the k3 KL to the reference is added
    (times the importance weight, with its gradient, when use_bias_correction_kl: TRL's default); the loss type's
    normaliser reduces it. `num_items_in_batch` (dapo, cispo, vespo) is the real-token count of the global
    accumulated batch (None: this micro-batch's).
    Metrics (TRL's names): entropy, kl (beta != 0), and the surrogate's (clip ratios; clip_ratio/low_min and
    clip_ratio/high_max are the min / max over completions of their clipped-token fraction, to be reduced by
    min / max, see `EXTREME_METRICS`).
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {sorted(GRPO_LOSS_TYPES)}")
    surrogate, normalizer = GRPO_LOSS_TYPES[loss_type]
    mask = completion_mask.to(per_token_logps.dtype)  # (B, T)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    # Zero the log-ratio at padding first: whatever sits there must not overflow exp() into inf·0 = nan.
    log_ratio = (per_token_logps - old) * mask
    ratio = torch.exp(_importance_log_weights(log_ratio, mask, importance_sampling_level))
    per_token_loss, metrics = SURROGATES[surrogate](SurrogateInputs(per_token_logps, log_ratio, ratio, adv, mask), params)
    if top_entropy_quantile < 1.0:
        if entropies is None:
            raise ValueError("grpo_loss: top_entropy_quantile < 1 needs entropies")
        per_token_loss = per_token_loss * high_entropy_mask(entropies, mask, top_entropy_quantile)
    if beta != 0.0:
        if ref_per_token_logps is None:
            raise ValueError("grpo_loss: beta != 0 needs ref_per_token_logps")
        per_token_kl = _reference_kl(per_token_logps, ref_per_token_logps, mask, ratio if use_bias_correction_kl else None)
        per_token_loss = per_token_loss + beta * per_token_kl
        metrics["kl"] = _mean(per_token_kl.detach(), mask)
    loss = GRPO_NORMALIZERS[normalizer](
        per_token_loss.expand_as(mask), mask, max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch, num_processes=num_processes,
    )
    if entropies is not None:
        metrics["entropy"] = masked_mean(entropies.float(), mask)
    return loss, metrics


def rloo_loss(
    per_token_logps: Tensor, advantages: Tensor, completion_mask: Tensor, old_logps: Tensor | None = None, *,
    epsilon: float = 0.2, epsilon_high: float | None = None, entropies: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """TRL's RLOO loss of one micro-batch: one importance ratio per completion from its summed log-probs,
    rho = exp(sum_t logp - old_logps), clipped, -min(rho A, clip(rho, 1-eps, 1+eps_high) A), mean over completions.

    per_token_logps (B, T) with grad, 0 at padding; advantages (B,); completion_mask (B, T) (a completion with an
    empty mask contributes -A with no gradient, as TRL's); old_logps (B,) the sampling policy's summed log-probs
    (None: on-policy, rho = 1 with the policy gradient). Every token of a completion gets the full sequence weight.
    Metrics: entropy (token mean) and the clip fractions over completions (low_min / high_max: min / max).
    """
    mask = completion_mask.to(per_token_logps.dtype)
    logps = (per_token_logps * mask).sum(-1)  # (B,)
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    high = epsilon if epsilon_high is None else epsilon_high
    loss = -torch.min(ratio * advantages, torch.clamp(ratio, 1 - epsilon, 1 + high) * advantages).mean()
    with torch.no_grad():
        low_clip = ((ratio < 1 - epsilon) & (advantages < 0)).float()
        high_clip = ((ratio > 1 + high) & (advantages > 0)).float()
        metrics = {"clip_ratio/low_mean": low_clip.mean(), "clip_ratio/high_mean": high_clip.mean(),
                   "clip_ratio/region_mean": torch.maximum(low_clip, high_clip).mean(),
                   "clip_ratio/low_min": low_clip.min(), "clip_ratio/high_max": high_clip.max()}
        if entropies is not None:
            metrics["entropy"] = masked_mean(entropies.float(), mask)
    return loss, metrics
