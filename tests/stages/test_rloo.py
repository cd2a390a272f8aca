"""RLOO: KL-in-reward, reward clipping, truncation masking and leave-one-out advantages, derived by hand; its
sequence-level loss by hand. (TRL's own code checks the same in tests/losses/test_trl_grpo_parity.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from prefalign.config import RLOOConfig
from prefalign.losses.grpo import rloo_loss
from prefalign.rollout.sampling import CompletionGroups
from prefalign.stages.rloo import RLOO
from prefalign.stages.rollout import ScoredRollout

LOGPS = torch.tensor([[-1.0, -2.0], [-1.0, -9.0], [-0.5, -0.5], [-1.0, -1.0]])
REF = torch.tensor([[-1.5, -2.0], [-1.0, 0.0], [-1.0, -1.0], [-1.0, -1.0]])
MASK = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])


def _prepare(cfg: RLOOConfig, rewards, loss_mask=MASK, passes=True):
    groups = CompletionGroups([[5], [6]], 2, torch.ones(4, 2, dtype=torch.long), MASK, 0)
    extra = {"sampling_logps": LOGPS, "ref_logps": REF} if passes else {}
    rollout = ScoredRollout(groups, torch.zeros(4, dtype=torch.bool), loss_mask, torch.tensor(rewards), extra)
    return RLOO(cfg, None, None).prepare(rollout)


def test_kl_is_subtracted_from_the_reward_before_the_leave_one_out_baseline():
    """Two prompts x G=2. Sequence k1 = sum over real tokens of (logp - ref):
    row 0: (-1 - -1.5) + (-2 - -2) = 0.5;  row 1: (-1 - -1) = 0 (its 2nd token is padding);
    row 2: (-0.5 - -1) + (-0.5 - -1) = 1.0;  row 3: 0.
    With beta 0.5 the rewards [1, 0, 2, 2] become [0.75, 0, 1.5, 2]; the leave-one-out advantage of a
    pair is the difference to the sibling: [0.75, -0.75, -0.5, 0.5]. `kl` is token-weighted (TRL's):
    1.5 over 7 real tokens."""
    kept, metrics = _prepare(RLOOConfig(beta=0.5, num_generations=2), [1.0, 0.0, 2.0, 2.0])
    assert kept["advantages"].tolist() == pytest.approx([0.75, -0.75, -0.5, 0.5])
    assert metrics["reward"] == pytest.approx(1.25)  # the task reward, before the penalty
    assert metrics["kl"] == pytest.approx(1.5 / 7)
    assert metrics["frac_reward_zero_std"] == 0.0 and "old_logps" not in kept


def test_truncated_completions_get_no_kl_penalty_and_rewards_are_clipped_first():
    """--mask_truncated_completions zeroes row 0's loss mask: its k1 (0.5) no longer counts. reward_clip_range
    [0, 1] clips the rewards [1, 0, 2, 2] to [1, 0, 1, 1] before the penalty (beta 0.5): [1, 0, 0.5, 1];
    the second group's clipped rewards differ, so no group has zero std. kl = 1.0 over 5 tokens."""
    loss_mask = MASK.clone()
    loss_mask[0] = 0
    cfg = RLOOConfig(beta=0.5, num_generations=2, reward_clip_range=[0.0, 1.0])
    kept, metrics = _prepare(cfg, [1.0, 0.0, 2.0, 2.0], loss_mask)
    assert kept["advantages"].tolist() == pytest.approx([1.0, -1.0, -0.5, 0.5])
    assert metrics["kl"] == pytest.approx(1.0 / 5) and metrics["frac_reward_zero_std"] == 0.0


def test_without_beta_the_advantages_are_plain_leave_one_out():
    cfg = RLOOConfig(beta=0.0, num_generations=2, num_iterations=2)
    kept, metrics = _prepare(cfg, [3.0, 0.0, 1.0, 1.0])
    # 3 - 0 = 3, 0 - 3 = -3; the second group is tied: advantages 0 and zero std (1 of 2 prompts)
    assert kept["advantages"].tolist() == pytest.approx([3.0, -3.0, 0.0, 0.0]) and "kl" not in metrics
    assert metrics["frac_reward_zero_std"] == 0.5
    # num_iterations > 1 keeps the sampler's summed log-probs over the loss tokens
    assert kept["old_logps"].tolist() == pytest.approx([-3.0, -1.0, -1.0, -2.0])


def test_rloo_loss_is_one_clipped_ratio_per_completion():
    """On-policy (ratio 1): loss = -mean(A) and each real token of completion i gets -A_i / B (the full sequence
    weight, no 1/length). Off-policy: row 0 has sum logp -1 - 0.5 = -1.5 and old -2: rho = e^0.5 = 1.65 > 1.2 with
    A = +1 -> clipped: -1.2, no gradient; row 1 rho = e^-0.1 = 0.905 with A = -1 -> unclipped: 0.905."""
    logps = torch.tensor([[-1.0, -0.5], [-0.3, 7.0]], requires_grad=True)
    mask, adv = torch.tensor([[1, 1], [1, 0]]), torch.tensor([1.0, -1.0])
    loss, m = rloo_loss(logps, adv, mask)
    assert loss.item() == pytest.approx(0.0)
    loss.backward()
    assert logps.grad.tolist() == [pytest.approx([-0.5, -0.5]), pytest.approx([0.5, 0.0])]
    logps.grad = None
    loss, m = rloo_loss(logps, adv, mask, torch.tensor([-2.0, -0.2]))
    assert loss.item() == pytest.approx((-1.2 + math.exp(-0.1)) / 2)
    assert m["clip_ratio/high_mean"].item() == 0.5 and m["clip_ratio/high_max"].item() == 1.0
    assert m["clip_ratio/low_min"].item() == 0.0
    loss.backward()
    assert logps.grad.tolist() == [pytest.approx([0.0, 0.0]), pytest.approx([math.exp(-0.1) / 2, 0.0])]
