"""Every preference loss against values derived by hand from two small pairs.

Pair 0: policy logps chosen −1, rejected −3; reference −2 and −2.5; 2 and 4 completion tokens; chosen NLL 0.5.
        log-ratios: chosen −1−(−2) = 1, rejected −3−(−2.5) = −0.5, so Δ = 1.5 and with β = 0.1, z = β·Δ = 0.15.
Pair 1: policy −4, −2; reference −3, −3; 1 and 2 tokens; NLL 4.0.
        log-ratios: chosen −1, rejected 1, Δ = −2, z = −0.2.
Expected values are written with `math` from the paper formulas; sp(x) = log(1 + eˣ) = −log σ(−x).
"""

from __future__ import annotations

import math

import pytest
import torch

from prefalign.config import DPOArgs
from prefalign.errors import PrefalignError
from prefalign.losses.preference import (
    LOSSES,
    PreferenceInputs,
    compute_preference_loss,
    needs_reference,
)
from prefalign.stages.dpo import preference_objective


def sp(x: float) -> float:
    return math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def make_inputs(with_ref: bool = True, **over) -> PreferenceInputs:
    t = torch.tensor
    fields = dict(
        chosen_logps=t([-1.0, -4.0]),
        rejected_logps=t([-3.0, -2.0]),
        ref_chosen_logps=t([-2.0, -3.0]) if with_ref else None,
        ref_rejected_logps=t([-2.5, -3.0]) if with_ref else None,
        chosen_lengths=t([2.0, 1.0]),
        rejected_lengths=t([4.0, 2.0]),
        chosen_nll=t([0.5, 4.0]),
        policy_weights=t([1.0, 1.0]),
    )
    fields.update(over)
    return PreferenceInputs(**fields)


def run(loss: str, x: PreferenceInputs | None = None, **cfg):
    args = DPOArgs(loss_type=[loss], **cfg)
    return compute_preference_loss(make_inputs() if x is None else x, preference_objective(args))


def close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=1e-5, atol=1e-6)


# name, extra config, expected losses of [pair 0, pair 1]
CASES = [
    # DPO: −log σ(z) = sp(−z)
    ("sigmoid", {}, [sp(-0.15), sp(0.2)]),
    # cDPO, ε = 0.1: (1−ε)·sp(−z) + ε·sp(z)
    ("sigmoid", {"label_smoothing": 0.1}, [0.9 * sp(-0.15) + 0.1 * sp(0.15), 0.9 * sp(0.2) + 0.1 * sp(-0.2)]),
    # relu(1 − z)
    ("hinge", {}, [0.85, 1.2]),
    # per-token log-ratios: 1/2 − (−0.5)/4 = 0.625 → (0.625 − 5)² ; −1/1 − 1/2 = −1.5 → (−6.5)²
    ("ipo", {}, [19.140625, 42.25]),
    # σ(z)(log σ(z) − log(1−ε)) + σ(−z)(log σ(−z) − log ε), ε = 1e-3
    (
        "exo_pair",
        {"label_smoothing": 1e-3},
        [sig(z) * (-sp(-z) - math.log1p(-1e-3)) + sig(-z) * (-sp(z) - math.log(1e-3)) for z in (0.15, -0.2)],
    ),
    # r_c = 0.1, r_r = −0.05: sp(−r_c) + ½ sp(r_c) + ½ sp(r_r); pair 1: r_c = −0.1, r_r = 0.1
    ("nca_pair", {}, [sp(-0.1) + 0.5 * sp(0.1) + 0.5 * sp(-0.05), sp(0.1) + 0.5 * sp(-0.1) + 0.5 * sp(0.1)]),
    # ((1−ε) sp(−z) − ε sp(z)) / (1 − 2ε), ε = 0.1
    ("robust", {"label_smoothing": 0.1}, [(0.9 * sp(-z) - 0.1 * sp(z)) / 0.8 for z in (0.15, -0.2)]),
    # δ = mean(0.1, −0.1, −0.05, 0.1) = 0.0125: sp(−(r_c − δ)) + sp(r_r − δ)
    ("bco_pair", {}, [sp(-(0.1 - 0.0125)) + sp(-0.05 - 0.0125), sp(-(-0.1 - 0.0125)) + sp(0.1 - 0.0125)]),
    # (lr_c − 5)² + (lr_r + 5)²: (1−5)² + (−0.5+5)² = 16 + 20.25 ; 36 + 36
    ("sppo_hard", {}, [36.25, 72.0]),
    # policy margins [2, −2] sorted [−2, 2]; reference margins [0.5, 0] sorted [0, 0.5]; δ = [−2, 1.5]
    ("aot", {}, [sp(0.2), sp(-0.15)]),
    # chosen lr sorted [−1, 1], rejected lr sorted [−0.5, 1]: δ = [−0.5, 0]
    ("aot_unpaired", {}, [sp(0.05), math.log(2)]),
    # 1 − σ(r_c) + σ(r_r)
    ("apo_zero", {}, [1 - sig(0.1) + sig(-0.05), 1 - sig(-0.1) + sig(0.1)]),
    # σ(r_c) + 1 − σ(r_c − r_r)
    ("apo_down", {}, [sig(0.1) + 1 - sig(0.15), sig(-0.1) + 1 - sig(-0.2)]),
    # m = σ(z/τ), τ = 0.05: sp(−z)(1 − m) + e^{−z} m
    ("discopop", {}, [sp(-z) * (1 - sig(z / 0.05)) + math.exp(-z) * sig(z / 0.05) for z in (0.15, -0.2)]),
    ("sft", {}, [0.5, 4.0]),
    # per-token Δ: 0.625 and −1.5
    ("sigmoid_norm", {}, [sp(-0.0625), sp(0.15)]),
    # averages −1/2 vs −3/4 and −4/1 vs −2/2: sp(−(β·Δavg − γ)), γ = 0.5
    ("simpo", {}, [sp(-(0.1 * 0.25 - 0.5)), sp(-(0.1 * -3.0 - 0.5))]),
    # sp(−β·Δ) + α·NLL with Δ = 2 and −2, α = 1
    ("cpo", {}, [sp(-0.2) + 0.5, sp(0.2) + 4.0]),
]


@pytest.mark.parametrize(
    ("name", "extra", "expected"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_loss_matches_hand_derivation(name, extra, expected):
    close(run(name, **extra).losses, expected)


def test_every_registered_loss_has_a_hand_derived_case():
    assert {c[0] for c in CASES} | {"orpo"} == set(LOSSES)


def test_orpo():
    """ORPO on averages c = −0.5, r = −0.75: log odds = (c − r) − (log(1−eᶜ) − log(1−eʳ)); NLL − β·log σ(odds)."""
    expected = []
    for c, r, nll in ((-0.5, -0.75, 0.5), (-4.0, -1.0, 4.0)):
        log_odds = (c - r) - (math.log(1 - math.exp(c)) - math.log(1 - math.exp(r)))
        expected.append(nll + 0.1 * sp(-log_odds))
    out = run("orpo", make_inputs(with_ref=False))
    close(out.losses, expected)
    close(out.chosen_rewards, [-0.05, -0.4])
    close(out.rejected_rewards, [-0.075, -0.1])


def test_dpo_rewards_are_beta_times_logratios_and_detached():
    x = make_inputs(chosen_logps=torch.tensor([-1.0, -4.0], requires_grad=True))
    out = run("sigmoid", x)
    close(out.chosen_rewards, [0.1, -0.1])
    close(out.rejected_rewards, [-0.05, 0.1])
    assert out.losses.requires_grad and not out.chosen_rewards.requires_grad


@pytest.mark.parametrize("name", ["simpo", "orpo", "cpo", "sft"])
def test_reference_free_losses_need_no_reference(name):
    with_ref = run(name)
    without = run(name, make_inputs(with_ref=False))
    close(without.losses, with_ref.losses.tolist())
    assert not needs_reference([name])


def test_reference_free_rewards():
    """SimPO reports β·average log-probs, CPO β·summed log-probs, sft without a reference β·log-probs."""
    x = make_inputs(with_ref=False)
    close(run("simpo", x).chosen_rewards, [-0.05, -0.4])
    close(run("cpo", x).rejected_rewards, [-0.3, -0.2])
    close(run("sft", x).chosen_rewards, [-0.1, -0.4])
    close(run("sft").chosen_rewards, [0.1, -0.1])  # with a reference: DPO's rewards


def test_simpo_does_not_average_twice_when_logps_are_already_means():
    means = make_inputs(chosen_logps=torch.tensor([-0.5, -4.0]), rejected_logps=torch.tensor([-0.75, -1.0]))
    close(run("simpo", means, length_normalize=True).losses, run("simpo").losses.tolist())


def test_bco_pair_uses_the_callers_running_mean():
    out = run("bco_pair", make_inputs(bco_delta=torch.tensor(0.0)))
    close(out.losses, [sp(-0.1) + sp(-0.05), sp(0.1) + sp(0.1)])


@pytest.mark.parametrize(
    ("kind", "coef", "deltas"),
    [
        ("reverse_kl", 1.0, (1.5, -2.0)),
        # f'(t) = 1 − 1/t: Δ = (1 − e^{−lr_c}) − (1 − e^{−lr_r}) = e^{−lr_r} − e^{−lr_c}
        ("forward_kl", 1.0, (math.exp(0.5) - math.exp(-1), math.exp(-1) - math.exp(1))),
        # f'(t) = log 2 + log σ(lr): Δ = log σ(lr_c) − log σ(lr_r)
        ("js_divergence", 1.0, (-sp(-1) + sp(0.5), -sp(1) + sp(-1))),
        # f'(t) = (t^(α−1) − 1)/(α − 1), α = 0.5: (e^{−lr/2} − 1)/(−0.5)
        (
            "alpha_divergence",
            0.5,
            (
                (math.exp(-0.5) - 1) / -0.5 - (math.exp(0.25) - 1) / -0.5,
                (math.exp(0.5) - 1) / -0.5 - (math.exp(-0.5) - 1) / -0.5,
            ),
        ),
        ("alpha_divergence", 1.0, (1.5, -2.0)),  # α → 1 is reverse KL
    ],
)
def test_f_divergences_change_the_sigmoid_logits(kind, coef, deltas):
    out = run("sigmoid", f_divergence_type=kind, f_alpha_divergence_coef=coef)
    close(out.losses, [sp(-0.1 * d) for d in deltas])
    close(out.chosen_rewards, [0.1, -0.1])  # rewards stay β·log-ratio


def test_weighted_sum_rpo_and_wpo():
    """[sigmoid, sft] with weights [1, 0.5], + 0.2·NLL, times WPO weights [0.5, 0.25]; rewards of sigmoid."""
    x = make_inputs(policy_weights=torch.tensor([0.5, 0.25]))
    args = DPOArgs(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], rpo_alpha=0.2, use_weighting=True)
    out = compute_preference_loss(x, preference_objective(args))
    close(out.losses, [(sp(-0.15) + 0.5 * 0.5 + 0.2 * 0.5) * 0.5, (sp(0.2) + 0.5 * 4.0 + 0.2 * 4.0) * 0.25])
    close(out.chosen_rewards, [0.1, -0.1])


def test_default_weights_are_one_and_wpo_off_ignores_weights():
    x = make_inputs(policy_weights=torch.tensor([0.5, 0.25]))
    out = compute_preference_loss(x, preference_objective(DPOArgs(loss_type=["hinge", "sppo_hard"])))
    close(out.losses, [0.85 + 36.25, 1.2 + 72.0])


def test_needs_reference():
    assert needs_reference(["sigmoid"])
    assert needs_reference(["simpo", "ipo"])
    assert not needs_reference(["simpo", "orpo", "cpo", "sft"])


def test_unknown_loss_names_the_flag_and_lists_valid_names():
    with pytest.raises(PrefalignError) as e:
        run("dpo_typo")
    assert e.value.where == "--loss_type"
    assert "'dpo_typo'" in e.value.reason and "sigmoid" in e.value.reason and "apo_zero" in e.value.reason


def test_weight_count_mismatch_names_loss_weights():
    with pytest.raises(PrefalignError) as e:
        compute_preference_loss(make_inputs(), preference_objective(DPOArgs(loss_type=["sigmoid", "sft"], loss_weights=[1.0])))
    assert e.value.where == "--loss_weights" and "1 weights given for 2 losses" in e.value.reason


@pytest.mark.parametrize(
    ("cfg", "flag"),
    [
        ({"loss_type": ["nca_pair"], "f_divergence_type": "forward_kl"}, "--f_divergence_type"),
        ({"loss_type": ["sigmoid"], "f_divergence_type": "chi2"}, "--f_divergence_type"),
        ({"loss_type": ["exo_pair"]}, "--label_smoothing"),
        ({"loss_type": ["robust"], "label_smoothing": 0.5}, "--label_smoothing"),
        ({"loss_type": ["aot"], "use_weighting": True}, "--use_weighting"),
        ({"loss_type": ["sigmoid"], "beta": 0.0}, "--beta"),
        ({"loss_type": []}, "--loss_type"),
        ({"loss_type": ["sigmoid"], "dpop_lambda": -1.0}, "--dpop_lambda"),
        ({"loss_type": ["simpo"], "dpop_lambda": 5.0}, "--dpop_lambda"),
    ],
)
def test_invalid_settings_raise_with_the_flag(cfg, flag):
    with pytest.raises(PrefalignError) as e:
        compute_preference_loss(make_inputs(), preference_objective(DPOArgs(**cfg)))
    assert e.value.where == flag


def test_reference_loss_without_reference_is_an_error():
    # an invariant of the stage (it computes a reference whenever the objective needs one), not a user error
    with pytest.raises(ValueError, match="needs a reference"):
        run("sigmoid", make_inputs(with_ref=False))


def test_dpop_penalty_inside_the_sigmoid():
    """DPOP (Smaug Eq. 3) with λ = 2: pair 0's chosen log-ratio is +1, so no penalty and the loss is DPO's sp(−0.15);
    pair 1's is −1 (s_ref,c − s_c = −3 − (−4) = 1), so Δ' = −2 − 2·1 = −4 and the loss is sp(−β·Δ') = sp(0.4).
    The penalty carries the chosen gradient: dℓ₁/ds_c = −σ(−z)·β(1 + λ) with z = −0.4. Rewards stay DPO's."""
    x = make_inputs(chosen_logps=torch.tensor([-1.0, -4.0], requires_grad=True))
    out = run("sigmoid", x, dpop_lambda=2.0)
    close(out.losses, [sp(-0.15), sp(0.4)])
    close(out.chosen_rewards, [0.1, -0.1])
    close(out.rejected_rewards, [-0.05, 0.1])
    out.losses.sum().backward()
    close(x.chosen_logps.grad, [-sig(-0.15) * 0.1, -sig(0.4) * 0.3])
    close(run("sigmoid", dpop_lambda=0.0).losses, run("sigmoid").losses.tolist())  # λ = 0 is DPO


def test_dpop_applies_to_the_chosen_score_of_other_losses():
    """IPO on per-token log-ratios with λ = 2: pair 0 is unpenalised, (1/2 − (−0.5/4) − 5)² = (0.625 − 5)²;
    pair 1's chosen score −1 − 2 = −3 over 1 token, rejected 1/2: (−3.5 − 5)² = 72.25."""
    close(run("ipo", dpop_lambda=2.0).losses, [(0.625 - 5) ** 2, 72.25])
