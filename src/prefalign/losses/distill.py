"""Distillation divergences: pure functions of student and teacher logits over the vocabulary.

`generalized_jsd` is GKD's generalized Jensen-Shannon divergence (Agarwal et al. 2024, as TRL 1.16's
`GKDTrainer.generalized_jsd_loss` computes it), per position:

    p_s = softmax(S / τ), p_t = softmax(T / τ)
    β = 0:       KL(p_t ‖ p_s)                          forward KL (teacher ‖ student)
    β = 1:       KL(p_s ‖ p_t)                          reverse KL (student ‖ teacher)
    0 < β < 1:   β·KL(p_t ‖ m) + (1 − β)·KL(p_s ‖ m),   m = β·p_t + (1 − β)·p_s

The endpoints are special cases, not limits: as β → 0 the mixture form goes to 0, not to the forward KL (TRL's
behaviour, kept). No τ² factor. `losses.stats.masked_mean` reduces per-position values as TRL's "batchmean" does (a mean over
the kept positions). Nothing here knows about models or chunks: `model.divergence` feeds these functions one chunk of
positions at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) over the last dimension, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, *, beta: float,
                    temperature: float = 1.0) -> Tensor:
    """Per-position generalized JSD (see the module docstring): (..., V) logits -> (...) divergences, in float32.
    The gradient flows into whichever inputs require it (the student's, in training)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0.0:
        return _kl(log_t, log_s)
    if beta == 1.0:
        return _kl(log_s, log_t)
    log_m = torch.logsumexp(torch.stack([log_s + math.log(1 - beta), log_t + math.log(beta)]), dim=0)
    return beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)
