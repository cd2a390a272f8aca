"""From token log-probs to per-pair preference inputs.

`model.logprobs.completion_logps` gives one row of completion-token log-probs per sequence (chosen pairs first,
then rejected, completion tokens left-aligned). This module reduces each row to one number per completion:

- the sum of its token log-probs (the mean with `length_normalize`, as MiniMind's DPO does);
- with `ld_alpha` (LD-DPO), tokens up to the length of the pair's shorter completion count fully and the rest
  ("verbose" tail) count `ld_alpha` times, so a longer answer cannot win on length alone (TRL's definition);
- the chosen completion's mean per-token NLL, with its gradient (RPO, sft, orpo, cpo);
- WPO's pair weight: exp(mean over tokens of log p(y_t) − log Σ_v p(v)²) for chosen plus rejected, clamped to 1
  as in the WPO authors' code (TRL 1.16 no longer clamps), without gradient.

The reference side is reduced the same way with the policy's masks.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from prefalign.losses.preference import Objective, PreferenceInputs

DEFAULT_OBJECTIVE = Objective()  # plain DPO: summed log-probs, no LD weighting, no WPO


class CompletionLogpsLike(Protocol):
    """What `model.logprobs.CompletionLogps` carries (any object with these attributes will do)."""

    token_logps: Tensor  # (2B, Tc) float32, 0 outside the mask
    mask: Tensor  # (2B, Tc) bool
    logits_mean_sum: Tensor  # (2B,)
    wpo_adjust: Tensor | None  # (2B, Tc) logsumexp(2 · log_softmax) per token, or None


def token_weights(mask: Tensor, ld_alpha: float | None) -> Tensor:
    """Weight of each completion token in the sequence log-prob: 1, or ld_alpha past the shorter completion."""
    weights = mask.float()  # (2B, Tc)
    if ld_alpha is None:
        return weights
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must lie in [0, 1], got {ld_alpha}")
    position = mask.long().cumsum(dim=1)  # (2B, Tc) 1-based index of each completion token
    lengths = mask.sum(dim=1)  # (2B,)
    chosen_len, rejected_len = lengths.chunk(2)
    shared = torch.minimum(chosen_len, rejected_len).repeat(
        2
    )  # (2B,) the pair's shorter length, on both rows
    tail = mask & (position > shared.unsqueeze(1))  # (2B, Tc) the verbose part of the longer completion
    return torch.where(tail, torch.full_like(weights, ld_alpha), weights)


def sequence_logps(token_logps: Tensor, weights: Tensor, length_normalize: bool) -> Tensor:
    """Weighted sum over completion tokens, divided by the summed weights when length-normalising."""
    # where(), not a product: a -inf outside the mask would turn 0·(-inf) into NaN.
    total = torch.where(weights > 0, token_logps * weights, torch.zeros_like(token_logps)).sum(dim=1)  # (2B,)
    return total / weights.sum(dim=1).clamp(min=1.0) if length_normalize else total


def wpo_weights(policy: CompletionLogpsLike) -> Tensor:
    """WPO pair weights `[B]` in (0, 1], without gradient."""
    if policy.wpo_adjust is None:
        raise ValueError(
            "use_weighting needs CompletionLogps.wpo_adjust (call completion_logps with with_wpo=True)"
        )
    with torch.no_grad():
        mask = policy.mask
        aligned = torch.where(
            mask, policy.token_logps - policy.wpo_adjust, torch.zeros_like(policy.token_logps)
        )
        mean = aligned.sum(dim=1) / mask.sum(dim=1).clamp(
            min=1
        )  # (2B,) per-token mean of the aligned log-prob
        chosen, rejected = mean.chunk(2)
        return torch.exp(chosen + rejected).clamp(max=1.0)  # (B,)


def preference_inputs(
    policy: CompletionLogpsLike, ref: CompletionLogpsLike | None, objective: Objective = DEFAULT_OBJECTIVE
) -> PreferenceInputs:
    """Reduce policy (and reference) token log-probs to the per-pair `PreferenceInputs` of `objective`'s losses."""
    length_normalize = objective.params.length_normalize
    mask = policy.mask.bool()  # (2B, Tc)
    if mask.shape[0] % 2 or policy.token_logps.shape != mask.shape:
        raise ValueError(
            f"expected [2B, Tc] token_logps and mask, got {tuple(policy.token_logps.shape)} "
            f"and {tuple(mask.shape)}"
        )
    weights = token_weights(mask, objective.ld_alpha)  # (2B, Tc)
    logps = sequence_logps(policy.token_logps, weights, length_normalize)  # (2B,)
    lengths = mask.sum(dim=1).float()  # (2B,)
    chosen_logps, rejected_logps = logps.chunk(2)
    chosen_lengths, rejected_lengths = lengths.chunk(2)

    # NLL of the chosen answer: plain mean over its tokens, regardless of ld_alpha / length_normalize.
    num_pairs = mask.shape[0] // 2
    chosen_tokens = torch.where(mask[:num_pairs], policy.token_logps[:num_pairs], 0.0)  # (B, Tc)
    chosen_nll = -chosen_tokens.sum(dim=1) / chosen_lengths.clamp(min=1.0)

    ref_chosen = ref_rejected = None
    if ref is not None:
        if ref.token_logps.shape != mask.shape:
            raise ValueError(
                f"reference token_logps {tuple(ref.token_logps.shape)} do not match the policy's "
                f"{tuple(mask.shape)}"
            )
        ref_logps = sequence_logps(ref.token_logps.detach(), weights, length_normalize)
        ref_chosen, ref_rejected = ref_logps.chunk(2)

    if objective.use_weighting:
        pair_weights = wpo_weights(policy)
    else:
        pair_weights = torch.ones_like(chosen_logps).detach()
    return PreferenceInputs(
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        chosen_nll=chosen_nll,
        policy_weights=pair_weights,
    )
