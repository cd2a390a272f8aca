"""RLOO: KL-in-reward and leave-one-out advantages, derived by hand."""

from __future__ import annotations

import pytest
import torch

from prefalign.config import RLOOConfig
from prefalign.stages.rloo import rloo_advantage_fn


def test_kl_is_subtracted_from_the_reward_before_the_leave_one_out_baseline():
    """Two prompts x G=2. Sequence k1 = sum over real tokens of (logp - ref):
    row 0: (-1 - -1.5) + (-2 - -2) = 0.5;  row 1: (-1 - -1) = 0 (its 2nd token is padding);
    row 2: (-0.5 - -1) + (-0.5 - -1) = 1.0;  row 3: 0.
    With beta 0.5 the rewards [1, 0, 2, 2] become [0.75, 0, 1.5, 2]; the leave-one-out advantage of a
    pair is the difference to the sibling: [0.75, -0.75, -0.5, 0.5]."""
    cfg = RLOOConfig(beta=0.5, num_generations=2)
    logps = torch.tensor([[-1.0, -2.0], [-1.0, -9.0], [-0.5, -0.5], [-1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0], [-1.0, 0.0], [-1.0, -1.0], [-1.0, -1.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    adv, metrics = rloo_advantage_fn(cfg)(torch.tensor([1.0, 0.0, 2.0, 2.0]), logps, ref, mask)
    assert adv.tolist() == pytest.approx([0.75, -0.75, -0.5, 0.5])
    assert metrics["reward"] == pytest.approx(1.25)  # the task reward, before the penalty
    # per-token KL per completion: 0.25, 0, 0.5, 0 -> mean 0.1875
    assert metrics["kl"] == pytest.approx(0.1875)


def test_without_beta_the_advantages_are_plain_leave_one_out():
    cfg = RLOOConfig(beta=0.0, num_generations=3)
    adv, metrics = rloo_advantage_fn(cfg)(torch.tensor([3.0, 0.0, 0.0]), None, None, torch.ones(3, 1))
    # 3 - 0 = 3; 0 - (3 + 0) / 2 = -1.5 twice
    assert adv.tolist() == pytest.approx([3.0, -1.5, -1.5]) and "kl" not in metrics


def test_rloo_defaults_follow_trl():
    cfg = RLOOConfig()
    assert (cfg.num_generations, cfg.beta, cfg.normalize_advantages) == (2, 0.05, False)
