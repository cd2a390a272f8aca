"""GRPO / RLOO / PPO objectives on tiny tensors whose expected values are derived by hand in each docstring."""

from __future__ import annotations

import math

import pytest
import torch

from prefalign.losses.grpo import (
    PolicyLossParams,
    group_advantages,
    grpo_loss,
    high_entropy_mask,
    kl_penalized_rewards,
    rloo_advantages,
)
from prefalign.losses.ppo import compute_gae, ppo_loss, ppo_rewards
from prefalign.losses.stats import kl_divergence, masked_whiten

LOG2 = math.log(2.0)


def approx(x, rel=1e-5, abs=1e-6):  # noqa: A002 - mirrors pytest.approx
    return pytest.approx(x, rel=rel, abs=abs)


# ------------------------------------------------------------------------------------------------------ KL


def test_kl_estimators_by_hand():
    """logp = log 0.5, ref = log 0.25: k1 = log 2; k2 = (log 2)^2 / 2; k3 = e^(-log 2) + log 2 - 1 = 0.5 + log 2 - 1."""
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    assert kl_divergence(logp, ref, "k1").item() == approx(LOG2)
    assert kl_divergence(logp, ref, "k2").item() == approx(LOG2**2 / 2)
    assert kl_divergence(logp, ref, "k3").item() == approx(0.5 + LOG2 - 1)
    same = torch.tensor([[-1.3, -0.2]])
    for est in ("k1", "k2", "k3"):
        assert torch.equal(kl_divergence(same, same, est), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_divergence(logp, ref, "k9")


# ---------------------------------------------------------------------------------------------- advantages


def test_group_advantages_group_scaling_and_zero_std_group():
    """Group 1 = [1, 0, 0, 0]: mean 0.25, unbiased std sqrt((0.75² + 3·0.25²)/3) = 0.5, so A = (r - 0.25)/(0.5 + 1e-4).
    Group 2 = [2, 2, 2, 2]: std 0, A = 0/(0 + 1e-4) = 0. reward_std is the std of all 8 (TRL logs that):
    mean 9/8, squared deviations 0.015625 + 3·1.265625 + 4·0.765625 = 6.875, std sqrt(6.875/7)."""
    rewards = torch.tensor([1.0, 0, 0, 0, 2, 2, 2, 2])
    adv, m = group_advantages(rewards, 4)
    expected = [0.75 / 0.5001] + [-0.25 / 0.5001] * 3 + [0.0] * 4
    assert adv.tolist() == approx(expected)
    assert m["reward"].item() == approx(9 / 8)
    assert m["reward_std"].item() == approx(math.sqrt(6.875 / 7))
    assert m["frac_reward_zero_std"].item() == approx(0.5)
    # True is TRL's alias of "group"
    assert torch.equal(group_advantages(rewards, 4, scale_rewards=True)[0], adv)


def test_group_advantages_none_and_batch():
    """none: only centred, [0.75, -0.25 x3, 0 x4]. batch: centred by the group mean, divided by the std of all 8:
    mean 9/8, squared deviations 0.015625 + 3·1.265625 + 4·0.765625 = 6.875, var 6.875/7, std 0.991031."""
    rewards = torch.tensor([1.0, 0, 0, 0, 2, 2, 2, 2])
    centred = [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]
    assert group_advantages(rewards, 4, scale_rewards="none")[0].tolist() == approx(centred)
    assert group_advantages(rewards, 4, scale_rewards=False)[0].tolist() == approx(centred)
    std = math.sqrt(6.875 / 7)
    adv, m = group_advantages(rewards, 4, scale_rewards="batch")
    assert adv.tolist() == approx([c / (std + 1e-4) for c in centred])
    assert m["frac_reward_zero_std"].item() == 0.0
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(rewards, 4, scale_rewards="prompt")


def test_rloo_advantages_leave_one_out():
    """[1, 0, 0, 0]: the 1 is compared with mean(0,0,0) = 0 -> 1; each 0 with mean(1,0,0) = 1/3 -> -1/3.
    [3, 5]: 3 - 5 = -2, 5 - 3 = 2. Normalised over the batch: mean 0, unbiased std of [1, -1/3 x3, -2, 2]."""
    rewards = torch.tensor([1.0, 0, 0, 0])
    assert rloo_advantages(rewards, 4).tolist() == approx([1.0, -1 / 3, -1 / 3, -1 / 3])
    assert rloo_advantages(torch.tensor([3.0, 5.0]), 2).tolist() == approx([-2.0, 2.0])
    raw = torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3])
    norm = rloo_advantages(rewards, 4, normalize_advantages=True)
    assert norm.tolist() == approx(((raw - raw.mean()) / (raw.std() + 1e-4)).tolist())
    assert rloo_advantages(rewards, 1).tolist() == [0.0] * 4  # no siblings, no baseline (TRL's eval case)


def test_unscorable_rewards_get_zero_advantage():
    """nan = every reward function returned None. Group [1, nan, 0, 0]: the nan is left out, mean of [1, 0, 0] = 1/3,
    unbiased std sqrt(((2/3)² + 2·(1/3)²)/2) = sqrt(1/3); the nan row gets 0. Group [5, nan]: one scorable member,
    std undefined -> all 0. RLOO on [1, nan, 0, 0]: baselines over scorable siblings: 1 - 0 = 1, 0 - 1/2 = -1/2."""
    nan = float("nan")
    adv, m = group_advantages(torch.tensor([1.0, nan, 0.0, 0.0]), 4)
    std = math.sqrt(1 / 3)
    assert adv.tolist() == approx([(2 / 3) / (std + 1e-4), 0.0, (-1 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4)])
    assert m["reward"].item() == approx(1 / 3)
    assert group_advantages(torch.tensor([5.0, nan]), 2)[0].tolist() == [0.0, 0.0]
    assert rloo_advantages(torch.tensor([1.0, nan, 0.0, 0.0]), 4).tolist() == approx([1.0, 0.0, -0.5, -0.5])
    assert rloo_advantages(torch.tensor([5.0, nan]), 2).tolist() == [0.0, 0.0]


def test_kl_penalized_rewards():
    """r - beta·sum k1 over real tokens: 1 - 0.5·(0.2 + 0.4) = 0.7 (the padding 9 is ignored)."""
    r = kl_penalized_rewards(torch.tensor([1.0]), torch.tensor([[0.2, 0.4, 9.0]]), torch.zeros(1, 3),
                             torch.tensor([[1, 1, 0]]), beta=0.5)
    assert r.tolist() == approx([0.7])


# ------------------------------------------------------------------------------------------------ GRPO loss


def _two_rows():
    """Row 0 has 3 real tokens, row 1 has 1 (then 2 padding positions holding garbage)."""
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, 55.0, -99.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    return logps, mask, torch.tensor([1.0, -2.0])


@pytest.mark.parametrize(
    ("loss_type", "kwargs", "expected"),
    [
        # on-policy ratio 1, so the per-token loss is -A: row 0 [-1, -1, -1], row 1 [2].
        ("grpo", {}, (-1.0 + 2.0) / 2),  # per-sequence mean, then mean over sequences
        ("bnpo", {}, (-3.0 + 2.0) / 4),  # token mean over the batch
        ("dr_grpo", {"max_completion_length": 4}, (-3.0 + 2.0) / (2 * 4)),  # B x max_completion_length
        ("dapo", {"num_items_in_batch": 10, "num_processes": 1}, (-3.0 + 2.0) / 10),  # global token count
        ("dapo", {"num_items_in_batch": 8, "num_processes": 2}, (-3.0 + 2.0) / 4),  # per process
        ("dapo", {}, (-3.0 + 2.0) / 4),  # no global count given: the local one
    ],
)
def test_grpo_loss_normalisations(loss_type, kwargs, expected):
    logps, mask, adv = _two_rows()
    loss, _ = grpo_loss(logps, adv, mask, loss_type=loss_type, **kwargs)
    assert loss.item() == approx(expected)


def test_grpo_loss_gradient_ignores_padding():
    """grpo: d/dlogp of -A·exp(logp - sg(logp)) is -A; row 0 tokens get -1/3/2, row 1's token 2/1/2, padding 0."""
    logps, mask, adv = _two_rows()
    loss, _ = grpo_loss(logps, adv, mask, loss_type="grpo")
    loss.backward()
    assert logps.grad.tolist() == [approx([-1 / 6] * 3), approx([1.0, 0.0, 0.0])]
    # Old log-probs that differ wildly only at padding change nothing.
    logps2, _, _ = _two_rows()
    old = logps2.detach().clone()
    old[1, 1:] = torch.tensor([-500.0, 500.0])
    assert grpo_loss(logps2, adv, mask, old_per_token_logps=old, loss_type="grpo")[0].item() == approx(0.5)


def test_grpo_clipping_regions_and_metrics():
    """Four one-token sequences, old logp 0, eps 0.2 (bnpo):
    r=1.5, A=+1: -min(1.5, 1.2) = -1.2 (high-clipped);  r=1.5, A=-1: -min(-1.5, -1.2) = 1.5 (not clipped);
    r=0.5, A=-1: -min(-0.5, -0.8) = 0.8 (low-clipped);   r=0.5, A=+1: -min(0.5, 0.8) = -0.5 (not clipped).
    loss = (-1.2 + 1.5 + 0.8 - 0.5)/4 = 0.15; low, high = 1/4 each, region 1/2. Clipped tokens get no gradient."""
    logps = torch.tensor([[math.log(1.5)], [math.log(1.5)], [math.log(0.5)], [math.log(0.5)]], requires_grad=True)
    old = torch.zeros(4, 1)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, m = grpo_loss(logps, adv, torch.ones(4, 1), old_per_token_logps=old, loss_type="bnpo",
                        params=PolicyLossParams(epsilon=0.2))
    assert loss.item() == approx(0.15)
    assert m["clip_ratio/low_mean"].item() == approx(0.25)
    assert m["clip_ratio/high_mean"].item() == approx(0.25)
    assert m["clip_ratio/region_mean"].item() == approx(0.5)
    loss.backward()
    # d(-A·r)/dlogp = -A·r / 4 for the unclipped; 0 for the clipped
    assert logps.grad.view(-1).tolist() == approx([0.0, 1.5 / 4, 0.0, -0.5 / 4])


def test_grpo_epsilon_high_and_delta():
    """epsilon_high 0.28: r=1.5, A=+1 is clipped to 1.28 -> loss -1.28.
    delta 1.4 (two-sided clip): r=1.5, A=-1: -min(-1.4, -1.2) = 1.4 instead of 1.5."""
    logp, old, mask = torch.tensor([[math.log(1.5)]]), torch.zeros(1, 1), torch.ones(1, 1)
    pos, neg = torch.tensor([1.0]), torch.tensor([-1.0])
    kw = {"old_per_token_logps": old, "loss_type": "bnpo"}
    assert grpo_loss(logp, pos, mask, params=PolicyLossParams(epsilon_high=0.28), **kw)[0].item() == approx(-1.28)
    assert grpo_loss(logp, neg, mask, **kw)[0].item() == approx(1.5)
    assert grpo_loss(logp, neg, mask, params=PolicyLossParams(delta=1.4), **kw)[0].item() == approx(1.4)


def test_grpo_sequence_level_importance_sampling():
    """GSPO, eps 0.2 / eps_high 0.5, A=+1. Row 0 log-ratios [log 2, 0]: ratio exp(log2/2) = √2 ≈ 1.414 < 1.5, so
    every token's loss is -√2 (token level would give -min(2, 1.5), -1 -> mean -1.25). Row 1 [log 4, log 4]:
    ratio 4, clipped to 1.5. grpo loss = mean(-√2, -1.5); high_mean counts sequences: 1/2."""
    logps = torch.tensor([[LOG2, 0.0], [2 * LOG2, 2 * LOG2]])
    old, mask, adv = torch.zeros(2, 2), torch.ones(2, 2), torch.tensor([1.0, 1.0])
    kw = {"old_per_token_logps": old, "loss_type": "grpo", "params": PolicyLossParams(epsilon=0.2, epsilon_high=0.5)}
    loss, m = grpo_loss(logps, adv, mask, importance_sampling_level="sequence", **kw)
    assert loss.item() == approx((-math.sqrt(2) - 1.5) / 2)
    assert m["clip_ratio/high_mean"].item() == approx(0.5)
    kw["old_per_token_logps"] = old[:1]
    token_loss, _ = grpo_loss(logps[:1], adv[:1], mask[:1], importance_sampling_level="token", **kw)
    assert token_loss.item() == approx(-1.25)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_loss(logps, adv, mask, importance_sampling_level="group", **kw)


def test_grpo_kl_penalty():
    """A = 0, ratio 1; logp = log 0.5, ref = log 0.25 -> k3 = 0.5 + log 2 - 1 per token; loss = beta·k3 (bnpo).
    beta = 0 -> no KL term, no `kl` metric, no reference needed."""
    logps = torch.full((1, 2), math.log(0.5))
    ref = torch.full((1, 2), math.log(0.25))
    k3 = 0.5 + LOG2 - 1
    loss, m = grpo_loss(logps, torch.zeros(1), torch.ones(1, 2), ref_per_token_logps=ref, beta=0.1, loss_type="bnpo")
    assert loss.item() == approx(0.1 * k3)
    assert m["kl"].item() == approx(k3)
    loss0, m0 = grpo_loss(logps, torch.zeros(1), torch.ones(1, 2), beta=0.0, loss_type="bnpo")
    assert loss0.item() == 0.0 and "kl" not in m0


def test_entropy_mask_top_quantile():
    """Real entropies [1, 2, 3, 4, 5] (a padding position holds 9). q = 0.4 keeps entropy >= quantile 0.6 =
    3 + 0.4·(4 - 3) = 3.4, i.e. tokens 4 and 5. With A = 1, ratio 1, bnpo: loss = -(1 + 1)/5 = -0.4.
    The entropy metric is the mean over real tokens: 3."""
    ent = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    keep = high_entropy_mask(ent, mask, 0.4)
    assert keep.tolist() == [[False, False, False, True, True, False]]
    assert high_entropy_mask(ent, mask, 1.0).tolist() == [[True] * 5 + [False]]
    loss, m = grpo_loss(torch.zeros(1, 6), torch.ones(1), mask, entropies=ent, top_entropy_quantile=0.4, loss_type="bnpo")
    assert loss.item() == approx(-0.4)
    assert m["entropy"].item() == approx(3.0)


def test_clip_extremes_are_per_completion_fractions():
    """Row 0: tokens r = [0.5, 1] with A = -1 -> low-clipped fraction 1/2; row 1: r = [1.5] with A = +1 -> high 1;
    row 2 is empty (no value: left out of the min / max, as TRL's nanmin). low_min = min(1/2, 0) = 0,
    high_max = max(0, 1) = 1."""
    logps = torch.tensor([[math.log(0.5), 0.0], [math.log(1.5), 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]])
    _, m = grpo_loss(logps, torch.tensor([-1.0, 1.0, 1.0]), mask, old_per_token_logps=torch.zeros(3, 2))
    assert m["clip_ratio/low_min"].item() == 0.0 and m["clip_ratio/high_max"].item() == 1.0
    _, m = grpo_loss(logps[:1], torch.tensor([-1.0]), mask[:1], old_per_token_logps=torch.zeros(1, 2))
    assert m["clip_ratio/low_min"].item() == approx(0.5)


def test_new_loss_types_on_policy_by_hand():
    """Ratio 1 (on-policy), rows of _two_rows (A = [1, -2]; row 0 has 3 tokens, row 1 has 1).
    sapo (grpo reduction): per token -sigma(0)·4/tau·A = -(2/tau)·A with tau_pos 1 / tau_neg 1.05:
      ((-2) + (2·2/1.05)) / 2; its gradient is -A·r·sigma'(0)·4 = -A, as vanilla GRPO's.
    luspo: mean over rows of token sums of -A: (-3 + 2) / 2.
    cispo: -min(r, eps_high = 0.2)·A·logp, token mean: -0.2·(1·(-3.5) + (-2)·(-0.7)) / 4.
    vespo: phi(1) = exp(lambda - lambda) = 1, so -A·logp, token mean: -(1·(-3.5) + (-2)·(-0.7)) / 4."""
    logps, mask, adv = _two_rows()
    sapo, _ = grpo_loss(logps, adv, mask, loss_type="sapo")
    assert sapo.item() == approx((-2.0 + 4 / 1.05) / 2)
    sapo.backward()
    assert logps.grad.tolist() == [approx([-1 / 6] * 3), approx([1.0, 0.0, 0.0])]
    assert grpo_loss(logps, adv, mask, loss_type="luspo")[0].item() == approx((-3.0 + 2.0) / 2)
    cispo, m = grpo_loss(logps, adv, mask, loss_type="cispo")
    assert cispo.item() == approx(-0.2 * (-3.5 + 1.4) / 4) and m["cispo_clip_ratio"].item() == approx(3 / 4)
    vespo, m = grpo_loss(logps, adv, mask, loss_type="vespo")
    assert vespo.item() == approx(-(-3.5 + 1.4) / 4) and m["vespo/phi_seq_mean"].item() == approx(1.0)


def test_grpo_rejects_bad_options():
    logps, mask, adv = _two_rows()
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logps, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logps, adv, mask, loss_type="dr_grpo")


# ------------------------------------------------------------------------------------------------------- PPO


def test_gae_three_steps_by_hand():
    """rewards [0, 0, 1], values [0.5, 0.6, 0.7], gamma 1, lam 0.95 (V after the end = 0):
    t=2: delta = 1 - 0.7 = 0.3, A2 = 0.3
    t=1: delta = 0 + 0.7 - 0.6 = 0.1, A1 = 0.1 + 0.95·0.3 = 0.385
    t=0: delta = 0 + 0.6 - 0.5 = 0.1, A0 = 0.1 + 0.95·0.385 = 0.46575;  returns = A + V = [0.96575, 0.985, 1.0].
    Row 1 is [0, 2, pad] with values [0.5, 1.0, pad]: t=1: delta = 2 - 1 = 1, A1 = 1; t=0: delta = 1 - 0.5 = 0.5,
    A0 = 0.5 + 0.95 = 1.45; returns [1.95, 2.0, 0]."""
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 1.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=0.95, whiten_advantages=False)
    assert adv.tolist() == [approx([0.46575, 0.385, 0.3]), approx([1.45, 1.0, 0.0])]
    assert ret.tolist() == [approx([0.96575, 0.985, 1.0]), approx([1.95, 2.0, 0.0])]
    # gamma 0.5, lam 0.5: A2 = 0.3; A1 = (0.35 - 0.6) + 0.25·0.3 = -0.175; A0 = (0.3 - 0.5) + 0.25·(-0.175) = -0.24375
    adv2, _ = compute_gae(rewards[:1], values[:1], mask[:1], gamma=0.5, lam=0.5, whiten_advantages=False)
    assert adv2.tolist() == [approx([-0.24375, -0.175, 0.3])]
    # whitened advantages: mean 0 and unbiased std 1 over the 5 real tokens, 0 at padding
    white, _ = compute_gae(rewards, values, mask)
    real = white[mask.bool()]
    assert real.mean().item() == approx(0.0, abs=1e-6) and real.std().item() == approx(1.0, rel=1e-4)
    assert white[1, 2].item() == 0.0


def test_masked_whiten_by_hand():
    """[2, 4, 6] (+ padding 100): mean 4, unbiased var (4 + 0 + 4)/2 = 4 -> [-1, 0, 1]; shift_mean=False -> [3, 4, 5]."""
    x, mask = torch.tensor([2.0, 4.0, 6.0, 100.0]), torch.tensor([1, 1, 1, 0])
    assert masked_whiten(x, mask)[:3].tolist() == approx([-1.0, 0.0, 1.0])
    assert masked_whiten(x, mask, shift_mean=False)[:3].tolist() == approx([3.0, 4.0, 5.0])


def test_ppo_rewards_kl_score_and_eos_penalty():
    """kl_coef 0.1, k1 = logp - ref: row 0 [0.1, 0.2, 0.3] -> non-score [-0.01, -0.02, -0.03], score 1 on the last
    token; row 1 [0.5, -0.5, pad] with score 2 - missing_eos_penalty 1 = 1 on token 1: [-0.05, 0.05 + 1, 0].
    objective/kl = mean(0.6, 0.0) = 0.3; non_score_reward = mean(-0.06, 0) = -0.03; scores = mean(1, 1) = 1;
    rlhf_reward = 1 - 0.03 = 0.97."""
    ref = torch.zeros(2, 3)
    logp = torch.tensor([[0.1, 0.2, 0.3], [0.5, -0.5, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, m = ppo_rewards(
        torch.tensor([1.0, 2.0]), logp, ref, mask, kl_coef=0.1, missing_eos_penalty=1.0,
        contains_eos=torch.tensor([True, False]),
    )
    assert rewards.tolist() == [approx([-0.01, -0.02, 0.97]), approx([-0.05, 1.05, 0.0])]
    assert m["objective/kl"].item() == approx(0.3)
    assert m["objective/non_score_reward"].item() == approx(-0.03)
    assert m["objective/scores"].item() == approx(1.0)
    assert m["objective/rlhf_reward"].item() == approx(0.97)
    # k3 of x = logp - ref is e^(-x) + x - 1
    r3, _ = ppo_rewards(torch.zeros(1), logp[:1], ref[:1], mask[:1], kl_coef=1.0, kl_estimator="k3")
    assert r3[0].tolist() == approx([-(math.exp(-x) + x - 1) for x in (0.1, 0.2, 0.3)])


def test_ppo_loss_clipping_by_hand():
    """cliprange 0.2, cliprange_value 0.2, vf_coef 0.1; token 3 is padding with garbage.
    token 1: r = 1.5, A = +1: max(-1.5, -1.2) = -1.2 (clipped); token 2: r = 1.5, A = -1: max(1.5, 1.2) = 1.5.
    pg = (-1.2 + 1.5)/2 = 0.15, clipfrac 1/2.
    token 1: V 0.5, V_old 0, R 1: clip(V) = 0.2; max(0.25, 0.64) = 0.64 (clipped); token 2: V 0.1, V_old 0, R 0:
    max(0.01, 0.01) = 0.01. vf = 0.5·(0.64 + 0.01)/2 = 0.1625, val clipfrac 1/2. loss = 0.15 + 0.1·0.1625.
    approxkl = 0.5·mean((log 1.5)², (log 1.5)²)."""
    old = torch.zeros(1, 3)
    logp = torch.tensor([[math.log(1.5), math.log(1.5), 400.0]])
    adv = torch.tensor([[1.0, -1.0, 50.0]])
    values, old_values, returns = torch.tensor([[0.5, 0.1, 9.0]]), torch.zeros(1, 3), torch.tensor([[1.0, 0.0, -9.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, m = ppo_loss(logp, old, adv, values, old_values, returns, mask, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    assert loss.item() == approx(0.15 + 0.1 * 0.1625)
    assert m["loss/policy_avg"].item() == approx(0.15)
    assert m["loss/value_avg"].item() == approx(0.1625)
    assert m["policy/clipfrac_avg"].item() == approx(0.5)
    assert m["val/clipfrac_avg"].item() == approx(0.5)
    assert m["policy/approxkl_avg"].item() == approx(0.5 * math.log(1.5) ** 2)
    assert m["val/ratio"].item() == approx(1.5)
