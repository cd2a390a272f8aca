"""Masked statistics and KL estimators the on-policy objectives share (GRPO, RLOO, PPO), as pure functions.

Masks are 1 on real completion tokens (up to and including EOS), 0 on padding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    return logps - ref_logps


def _k2(logps: Tensor, ref_logps: Tensor) -> Tensor:
    return 0.5 * (logps - ref_logps) ** 2


def _k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    # Schulman's unbiased, always non-negative estimator of KL(policy || ref) from samples of the policy.
    log_ratio = ref_logps - logps
    return torch.exp(log_ratio) - log_ratio - 1


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_divergence(logps: Tensor, ref_logps: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token KL(policy || ref) estimate from sampled tokens. `logps`, `ref_logps`: (B, T) -> (B, T).

    k1 = logp - ref (unbiased, can be negative), k2 = (logp - ref)^2 / 2, k3 = exp(ref - logp) - (ref - logp) - 1.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {estimator!r}; choose one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logps, ref_logps)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` where `mask` is 1 (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `values` where `mask` is 1, with Bessel's correction as TRL applies it."""
    mask = mask.to(values.dtype)
    centered = values - masked_mean(values, mask)
    variance = masked_mean(centered**2, mask)
    count = mask.sum()
    if unbiased and count > 1:
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(values - mean) / sqrt(var + 1e-8) over masked entries; `shift_mean=False` adds the mean back (only scales)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def nanstd(values: Tensor, dim: int | None = None) -> Tensor:
    """Unbiased std ignoring nan; nan where fewer than 2 values are present (TRL's nanstd)."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dim)
    count = (~torch.isnan(values)).sum(dim=dim).to(values.dtype)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(count, float("nan")))
    return torch.sqrt(variance * correction)

