"""The distillation divergence against hand-derived values and against TRL 1.16's own `generalized_jsd_loss`."""

from __future__ import annotations

import math
import os

import pytest
import torch

from prefalign.losses.distill import generalized_jsd
from prefalign.losses.stats import masked_mean

# two positions, vocabulary of 2: p_s = (0.5, 0.5) and p_t = (0.8, 0.2) at position 0; equal at position 1
STUDENT = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
TEACHER = torch.tensor([[math.log(4.0), 0.0], [1.0, 2.0]])


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_endpoints_are_forward_and_reverse_kl_by_hand() -> None:
    ps, pt = [0.5, 0.5], [0.8, 0.2]
    fwd = generalized_jsd(STUDENT, TEACHER, beta=0.0)
    rev = generalized_jsd(STUDENT, TEACHER, beta=1.0)
    assert fwd[0].item() == pytest.approx(_kl(pt, ps), abs=1e-6)  # KL(teacher || student) = 0.19274
    assert rev[0].item() == pytest.approx(_kl(ps, pt), abs=1e-6)  # KL(student || teacher) = 0.22314
    assert fwd[1].item() == pytest.approx(0.0, abs=1e-7) and rev[1].item() == pytest.approx(0.0, abs=1e-7)


def test_mixture_by_hand_and_beta_near_zero_is_not_forward_kl() -> None:
    ps, pt, beta = [0.5, 0.5], [0.8, 0.2], 0.3
    m = [beta * t + (1 - beta) * s for s, t in zip(ps, pt)]  # (0.59, 0.41)
    want = beta * _kl(pt, m) + (1 - beta) * _kl(ps, m)
    assert generalized_jsd(STUDENT, TEACHER, beta=beta)[0].item() == pytest.approx(want, abs=1e-6)
    # the mixture form vanishes as beta -> 0 (about beta x KL(t || s)), unlike the beta = 0 endpoint
    tiny = generalized_jsd(STUDENT, TEACHER, beta=1e-4)[0].item()
    assert tiny < 1e-4 < generalized_jsd(STUDENT, TEACHER, beta=0.0)[0].item()


def test_temperature_divides_both_logits() -> None:
    got = generalized_jsd(STUDENT, TEACHER, beta=0.0, temperature=2.0)[0].item()
    ps, pt = [0.5, 0.5], [2 / 3, 1 / 3]  # softmax((log 4, 0) / 2) = (2, 1) / 3
    assert got == pytest.approx(_kl(pt, ps), abs=1e-6)


def test_masked_mean_and_bad_arguments() -> None:
    values = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(STUDENT, TEACHER, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        generalized_jsd(STUDENT, TEACHER, beta=0.5, temperature=0.0)


def test_gradient_reaches_the_student_only() -> None:
    s = STUDENT.clone().requires_grad_(True)
    generalized_jsd(s, TEACHER, beta=0.5).sum().backward()
    assert s.grad is not None and s.grad[0].abs().sum() > 0
    assert s.grad[1].abs().sum() < 1e-7  # equal distributions: a minimum


@pytest.mark.parametrize("student_logit", [0.0, -4.0, -8.0])
def test_jsd_gradient_fades_where_the_student_misses_the_teachers_token(student_logit: float) -> None:
    """Why the demo distils with beta 0: on the token the teacher is sure of (p ~ 1), the forward KL's gradient in
    the student's logit is q - p ~ -1 whatever the student's probability q; the JSD's (beta 0.5) shrinks with q,
    about -(1 - beta) * q * log(beta / q) for small q (by hand), so a student that gives it almost no mass barely
    moves."""
    teacher = torch.tensor([[0.0, 0.0, 8.0]])
    grads = {}
    for beta in (0.0, 0.5):
        s = torch.tensor([[2.0, 0.0, student_logit]], requires_grad=True)
        generalized_jsd(s, teacher, beta=beta).sum().backward()
        grads[beta] = s.grad[0, 2].item()
    q = torch.tensor([2.0, 0.0, student_logit]).softmax(-1)[2].item()
    p = teacher.softmax(-1)[0, 2].item()
    assert grads[0.0] == pytest.approx(q - p, abs=1e-6)  # softmax cross-entropy on the teacher's distribution
    assert -6 * q < grads[0.5] < 0


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_equal_to_trl_generalized_jsd_loss(beta: float, temperature: float) -> None:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 5, 17, generator=g) * 2, torch.randn(3, 5, 17, generator=g) * 2
    labels = torch.randint(0, 17, (3, 5), generator=g)
    labels[0, :2] = -100
    labels[2, 3:] = -100
    trl = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)
    ours = masked_mean(generalized_jsd(student, teacher, beta=beta, temperature=temperature), labels != -100)
    assert ours.item() == pytest.approx(trl.item(), rel=1e-5, abs=1e-7)
    per_token = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta, temperature=temperature,
                                                    reduction="none").sum(-1)  # (B, T)
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=beta, temperature=temperature), per_token,
                               rtol=1e-5, atol=1e-6)
