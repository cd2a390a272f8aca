"""Token log-probs → per-pair inputs, checked against sums worked out by hand.

Two pairs, Tc = 4, completion tokens left-aligned (rows: chosen 0, chosen 1, rejected 0, rejected 1):
    chosen 0   [-0.5, -1.5]             sum -2.0   mean -1.0    len 2
    chosen 1   [-1.0, -2.0, -3.0]       sum -6.0   mean -2.0    len 3
    rejected 0 [-1.0, -1.0, -2.0, -0.5] sum -4.5   mean -1.125  len 4
    rejected 1 [-0.25]                  sum -0.25  mean -0.25   len 1
Positions outside the mask hold -inf, which must never leak into a result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from prefalign.config import DPOArgs
from prefalign.errors import PrefalignError
from prefalign.losses.aggregate import preference_inputs
from prefalign.losses.preference import compute_preference_loss
from prefalign.stages.dpo import preference_objective

NEG = -math.inf
TOKENS = [
    [-0.5, -1.5, NEG, NEG],
    [-1.0, -2.0, -3.0, NEG],
    [-1.0, -1.0, -2.0, -0.5],
    [-0.25, NEG, NEG, NEG],
]


@dataclass
class Logps:
    """Stand-in with the fields of model.logprobs.CompletionLogps (that module is owned elsewhere)."""

    token_logps: torch.Tensor
    mask: torch.Tensor
    logits_mean_sum: torch.Tensor
    wpo_adjust: torch.Tensor | None = None


def make(tokens=TOKENS, shift: float = 0.0, grad: bool = False, wpo_adjust=None) -> Logps:
    t = torch.tensor(tokens)
    mask = t > NEG
    t = torch.where(mask, t + shift, t).requires_grad_(grad)
    return Logps(t, mask, torch.zeros(4), wpo_adjust)


def close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_sum_lengths_and_chosen_nll():
    x = preference_inputs(make(), None, preference_objective(DPOArgs()))
    close(x.chosen_logps, [-2.0, -6.0])
    close(x.rejected_logps, [-4.5, -0.25])
    close(x.chosen_lengths, [2.0, 3.0])
    close(x.rejected_lengths, [4.0, 1.0])
    close(x.chosen_nll, [1.0, 2.0])  # −sum / length of the chosen rows
    assert x.ref_chosen_logps is None and x.ref_rejected_logps is None
    close(x.policy_weights, [1.0, 1.0])


def test_length_normalize_takes_the_mean():
    x = preference_inputs(make(), None, preference_objective(DPOArgs(length_normalize=True)))
    close(x.chosen_logps, [-1.0, -2.0])
    close(x.rejected_logps, [-1.125, -0.25])
    close(x.chosen_nll, [1.0, 2.0])  # unchanged


def test_ld_dpo_weights_the_tail_past_the_shorter_completion():
    """Pair 0 shares 2 tokens: rejected = (−1 −1) + 0.5·(−2 −0.5) = −3.25; chosen unchanged −2.
    Pair 1 shares 1 token: chosen = −1 + 0.5·(−2 −3) = −3.5; rejected unchanged −0.25."""
    x = preference_inputs(make(), None, preference_objective(DPOArgs(ld_alpha=0.5)))
    close(x.chosen_logps, [-2.0, -3.5])
    close(x.rejected_logps, [-3.25, -0.25])
    x0 = preference_inputs(make(), None, preference_objective(DPOArgs(ld_alpha=0.0)))  # only the shared prefix counts
    close(x0.chosen_logps, [-2.0, -1.0])
    close(x0.rejected_logps, [-2.0, -0.25])
    x1 = preference_inputs(make(), None, preference_objective(DPOArgs(ld_alpha=1.0)))  # no down-weighting at all
    close(x1.rejected_logps, [-4.5, -0.25])


def test_ld_with_length_normalize_divides_by_the_summed_weights():
    """rejected 0: −3.25 / (1 + 1 + 0.5 + 0.5) ; chosen 1: −3.5 / (1 + 0.5 + 0.5)."""
    x = preference_inputs(make(), None, preference_objective(DPOArgs(ld_alpha=0.5, length_normalize=True)))
    close(x.chosen_logps, [-1.0, -1.75])
    close(x.rejected_logps, [-3.25 / 3, -0.25])


def test_ld_alpha_out_of_range():
    with pytest.raises(PrefalignError) as e:
        preference_inputs(make(), None, preference_objective(DPOArgs(ld_alpha=1.5)))
    assert e.value.where == "--ld_alpha"


def test_reference_is_aggregated_the_same_way_and_detached():
    """Reference = policy − 0.1 per token: LD sums shift by −0.1 per weighted token."""
    ref = make(shift=-0.1, grad=True)
    x = preference_inputs(make(), ref, preference_objective(DPOArgs(ld_alpha=0.5)))
    close(x.ref_chosen_logps, [-2.2, -3.5 - 0.1 * 2])
    close(x.ref_rejected_logps, [-3.25 - 0.1 * 3, -0.35])
    assert not x.ref_chosen_logps.requires_grad


def test_gradients_flow_to_logps_and_nll():
    policy = make(grad=True)
    x = preference_inputs(policy, None, preference_objective(DPOArgs()))
    x.chosen_nll[0].backward()
    # d/d token of −(a + b)/2 is −1/2 on chosen 0's two tokens, 0 everywhere else (incl. the −inf pads).
    expected = torch.zeros(4, 4)
    expected[0, :2] = -0.5
    torch.testing.assert_close(policy.token_logps.grad, expected)


def test_wpo_weights():
    """aligned = logp − adjust per token; pair 0: chosen −0.2, rejected −0.4 → exp(−0.6);
    pair 1: +0.3 and +0.1 → exp(0.4) > 1, clamped to 1."""
    t = torch.tensor(TOKENS)
    offsets = torch.tensor([0.2, -0.3, 0.4, -0.1]).unsqueeze(1)  # adjust = logp + offset, per row
    policy = make(grad=True, wpo_adjust=t + offsets)
    x = preference_inputs(policy, None, preference_objective(DPOArgs(use_weighting=True)))
    close(x.policy_weights, [math.exp(-0.6), 1.0])
    assert not x.policy_weights.requires_grad


def test_wpo_without_adjust_is_an_error():
    with pytest.raises(ValueError, match="wpo_adjust"):
        preference_inputs(make(), None, preference_objective(DPOArgs(use_weighting=True)))


def test_end_to_end_dpo_value():
    """Policy as above, reference = policy − 0.1 per token: log-ratios 0.1·len, so
    Δ = 0.1·(2 − 4) = −0.2 (pair 0) and 0.1·(3 − 1) = 0.2 (pair 1); β = 0.1 → loss log(1 + e^{−β·Δ})."""
    x = preference_inputs(make(grad=True), make(shift=-0.1), preference_objective(DPOArgs()))
    out = compute_preference_loss(x, preference_objective(DPOArgs()))
    close(out.losses, [math.log1p(math.exp(0.02)), math.log1p(math.exp(-0.02))])
    close(out.chosen_rewards, [0.02, 0.03])
    out.losses.sum().backward()
