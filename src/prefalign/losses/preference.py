"""Preference losses: pure functions of sequence log-probs, registered by name.

Each loss takes `PreferenceInputs` (one value per pair, `[B]`) and the few hyper-parameters losses read
(`LossParams`) and returns per-pair losses plus the implicit rewards TRL logs for it. `compute_preference_loss`
combines several of them as an `Objective` says (MPO-style weighted sum), adds RPO's NLL term and applies WPO's
pair weights. Nothing here knows about models, devices, batches of tokens or flags: the stage that builds the
`Objective` from a config validates it and names the flag at fault; `losses.aggregate` turns token log-probs
into these inputs.

Formulas follow TRL 1.16's `DPOTrainer` (and its experimental CPO/ORPO trainers for `simpo`, `cpo`, `orpo`)
so values match TRL on the same inputs, with these deliberate differences:
- `sigmoid` keeps conservative DPO's `label_smoothing` (TRL 1.16 dropped it from `sigmoid`; with 0 they agree).
- `bco_pair` subtracts the BCO reward shift δ. TRL < 1.0 kept a running mean of the rewards across steps;
  a pure function cannot, so δ is `inputs.bco_delta` when the caller tracks a running mean, else the mean of the
  batch's detached rewards (chosen and rejected). TRL 1.16 uses no shift at all (pass `bco_delta=0` for that).
- `sft`, `cpo`, `orpo` and the RPO term use the mean NLL of each chosen completion; TRL averages over all chosen
  tokens of the batch (identical when the chosen completions have equal lengths). Ours does not depend on how
  pairs are grouped into batches, so gradient accumulation stays exact.
- ORPO's NLL covers completion tokens only (TRL's ORPO trainer also scores the prompt).

DPO-Positive (DPOP, Pal et al. 2024, "Smaug", Eq. 3; not in TRL) is a penalty the Objective applies before the
losses (`dpop_lambda`): the chosen log-prob each loss reads is lowered by λ·max(0, s_ref,c − s_c), so the chosen
log-ratio becomes r_c − λ·relu(−r_c) and `sigmoid` computes −log σ(β·(Δ − λ·relu(s_ref,c − s_c))), the penalty inside
the sigmoid and scaled by β as in the paper. It is active only where the chosen answer fell below the reference; with
other reference losses the same penalty enters their margin. Logged rewards stay DPO's β·r.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PreferenceInputs:
    """Per-pair quantities every loss is computed from; all `[B]`."""

    chosen_logps: Tensor
    """Sequence log-prob of the chosen completion (sum, mean with length_normalize, LD-weighted with ld_alpha)."""
    rejected_logps: Tensor
    ref_chosen_logps: Tensor | None
    """Same aggregation under the reference model; None when no reference was computed (reference-free losses)."""
    ref_rejected_logps: Tensor | None
    chosen_lengths: Tensor
    """Number of completion tokens, as float."""
    rejected_lengths: Tensor
    chosen_nll: Tensor
    """Mean per-token NLL of the chosen completion (keeps its gradient)."""
    policy_weights: Tensor
    """WPO pair weights in (0, 1] (no gradient); ones when use_weighting is off."""
    bco_delta: Tensor | None = None
    """BCO reward shift (scalar) from a running mean kept by the caller; None: the batch mean."""


@dataclass
class LossOutput:
    losses: Tensor  # (B,) per-pair loss, to be summed or averaged by the caller
    chosen_rewards: Tensor  # (B,) detached
    rejected_rewards: Tensor  # (B,) detached


@dataclass(frozen=True)
class LossParams:
    """The hyper-parameters the preference losses read (TRL's names; see config.preference.DPOArgs for each)."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    discopop_tau: float = 0.05
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    length_normalize: bool = False


@dataclass(frozen=True)
class Objective:
    """A validated preference objective: which losses with which weights, their parameters, the RPO term, DPOP's
    penalty, and how token log-probs are aggregated per completion (length_normalize in `params`, ld_alpha, WPO
    weighting)."""

    losses: tuple[tuple[str, float], ...] = (("sigmoid", 1.0),)
    params: LossParams = LossParams()
    rpo_alpha: float | None = None
    use_weighting: bool = False
    ld_alpha: float | None = None
    dpop_lambda: float | None = None

    @property
    def needs_reference(self) -> bool:
        return needs_reference([name for name, _ in self.losses])


LossFn = Callable[[PreferenceInputs, LossParams], LossOutput]


@dataclass(frozen=True)
class LossTraits:
    reference_free: bool = False
    """The loss never reads the reference log-probs."""
    f_divergence: bool = False
    """The loss is built on the chosen-minus-rejected score difference, so f-DPO's divergences apply."""
    sorts_batch: bool = False
    """The loss sorts pairs across the batch (AOT), which would misalign WPO's per-pair weights."""


LOSSES: dict[str, LossFn] = {}
LOSS_TRAITS: dict[str, LossTraits] = {}
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def register(name: str, **traits: bool) -> Callable[[LossFn], LossFn]:
    """Add a loss to `LOSSES` under `name` (traits: reference_free, f_divergence, sorts_batch)."""

    def deco(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        LOSS_TRAITS[name] = LossTraits(**traits)
        return fn

    return deco


def needs_reference(loss_types: list[str]) -> bool:
    """Whether any of `loss_types` reads reference log-probs (unknown names count as needing one)."""
    return any(name not in LOSS_TRAITS or not LOSS_TRAITS[name].reference_free for name in loss_types)


# ---------------------------------------------------------------- shared pieces


def _logratios(x: PreferenceInputs) -> tuple[Tensor, Tensor]:
    if x.ref_chosen_logps is None or x.ref_rejected_logps is None:
        raise ValueError("this loss needs reference log-probs but PreferenceInputs has none")
    return x.chosen_logps - x.ref_chosen_logps, x.rejected_logps - x.ref_rejected_logps  # (B,), (B,)


def _f_scores(logratios: Tensor, p: LossParams) -> Tensor:
    """f'(π/π_ref) of f-DPO, written in terms of log r = log π − log π_ref (TRL's parameterisation)."""
    kind = p.f_divergence_type
    if kind == "forward_kl":  # f'(t) = 1 − 1/t
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":  # f'(t) = log(2t / (1 + t)) = log 2 + log σ(log t)
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence" and abs(p.f_alpha_divergence_coef - 1.0) >= 1e-6:
        a = p.f_alpha_divergence_coef  # f'(t) = (t^(α−1) − 1) / (α − 1); α → 1 is reverse KL
        # The exponent is clamped (in float32) so that exp stays finite, as TRL does.
        clamp_max = 11.0 if logratios.dtype == torch.float16 else 80.0
        t = torch.clamp(((a - 1.0) * logratios).float(), max=clamp_max)
        return (torch.exp(t) - 1.0).to(logratios.dtype) / (a - 1.0)
    return logratios  # reverse KL: standard DPO


def _scores(x: PreferenceInputs, p: LossParams) -> tuple[Tensor, Tensor]:
    chosen_lr, rejected_lr = _logratios(x)
    return _f_scores(chosen_lr, p), _f_scores(rejected_lr, p)


def _per_token(value: Tensor, lengths: Tensor, p: LossParams) -> Tensor:
    """Length-average a sequence quantity, unless the log-probs are already means (length_normalize)."""
    return value if p.length_normalize else value / lengths.clamp(min=1.0)


def _dpo_rewards(x: PreferenceInputs, p: LossParams) -> tuple[Tensor, Tensor]:
    chosen_lr, rejected_lr = _logratios(x)
    return p.beta * chosen_lr.detach(), p.beta * rejected_lr.detach()


def _out(losses: Tensor, x: PreferenceInputs, p: LossParams) -> LossOutput:
    return LossOutput(losses, *_dpo_rewards(x, p))


def _smoothed_sigmoid(z: Tensor, eps: float) -> Tensor:
    """−(1−ε)·log σ(z) − ε·log σ(−z): the logistic loss with labels flipped with probability ε."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, switching formula at −log 2 to avoid cancellation."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


# ---------------------------------------------------------------- losses with a reference


@register("sigmoid", f_divergence=True)
def sigmoid(x: PreferenceInputs, p: LossParams) -> LossOutput:
    """DPO; with label_smoothing ε > 0, conservative DPO (cDPO)."""
    chosen, rejected = _scores(x, p)
    return _out(_smoothed_sigmoid(p.beta * (chosen - rejected), p.label_smoothing), x, p)


@register("hinge", f_divergence=True)
def hinge(x: PreferenceInputs, p: LossParams) -> LossOutput:
    """SLiC: relu(1 − β·Δ)."""
    chosen, rejected = _scores(x, p)
    return _out(torch.relu(1 - p.beta * (chosen - rejected)), x, p)


@register("ipo", f_divergence=True)
def ipo(x: PreferenceInputs, p: LossParams) -> LossOutput:
    """IPO Eq. 17, (Δ − 1/(2β))², on per-token log-ratios as TRL (and the IPO authors) use."""
    chosen, rejected = _scores(x, p)
    delta = _per_token(chosen, x.chosen_lengths, p) - _per_token(rejected, x.rejected_lengths, p)
    return _out((delta - 1 / (2 * p.beta)) ** 2, x, p)


@register("exo_pair", f_divergence=True)
def exo_pair(x: PreferenceInputs, p: LossParams) -> LossOutput:
    """EXO (Eq. 16): KL from the model's pair distribution σ(±β·Δ) to the smoothed labels [1−ε, ε]."""
    chosen, rejected = _scores(x, p)
    z = p.beta * (chosen - rejected)
    eps = p.label_smoothing
    losses = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )
    return _out(losses, x, p)


@register("nca_pair")
def nca_pair(x: PreferenceInputs, p: LossParams) -> LossOutput:
    """NCA: −log σ(r_c) − ½ log σ(−r_c) − ½ log σ(−r_r) with r = β·log-ratio."""
    chosen_r, rejected_r = (p.beta * lr for lr in _logratios(x))
    losses = -F.logsigmoid(chosen_r) - 0.5 * F.logsigmoid(-chosen_r) - 0.5 * F.logsigmoid(-rejected_r)
    return _out(losses, x, p)


@register("robust", f_divergence=True)
def robust(x: PreferenceInputs, p: LossParams) -> LossOutput:
    """rDPO: unbiased loss under label flips with probability ε, ((1−ε)ℓ(z) − εℓ(−z)) / (1−2ε)."""
    chosen, rejected = _scores(x, p)
    z = p.beta * (chosen - rejected)
    eps = p.label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return _out(losses, x, p)


@register("bco_pair")
def bco_pair(x: PreferenceInputs, p: LossParams) -> LossOutput:
    """BCO on pairs: −log σ(r_c − δ) − log σ(−(r_r − δ)), δ the reward shift (see the module docstring)."""
    chosen_r, rejected_r = (p.beta * lr for lr in _logratios(x))
    if x.bco_delta is not None:
        delta = x.bco_delta.detach()
    else:
        delta = torch.cat([chosen_r, rejected_r]).mean().detach()
    losses = -F.logsigmoid(chosen_r - delta) - F.logsigmoid(-(rejected_r - delta))
    return _out(losses, x, p)


@register("sppo_hard")
def sppo_hard(x: PreferenceInputs, p: LossParams) -> LossOutput:
    """SPPO with hard win probabilities (1 for chosen, 0 for rejected): (lr_c − 1/(2β))² + (lr_r + 1/(2β))²."""
    chosen_lr, rejected_lr = _logratios(x)
    losses = (chosen_lr - 0.5 / p.beta) ** 2 + (rejected_lr + 0.5 / p.beta) ** 2
    return _out(losses, x, p)


@register("aot", sorts_batch=True)
def aot(x: PreferenceInputs, p: LossParams) -> LossOutput:
    """AOT (paired): match the sorted policy margins against the sorted reference margins across the batch."""
    rewards = _dpo_rewards(x, p)  # raises when there is no reference
    assert x.ref_chosen_logps is not None and x.ref_rejected_logps is not None
    policy_sorted, _ = torch.sort(x.chosen_logps - x.rejected_logps, dim=0)
    ref_sorted, _ = torch.sort(x.ref_chosen_logps - x.ref_rejected_logps, dim=0)
    losses = _smoothed_sigmoid(p.beta * (policy_sorted - ref_sorted), p.label_smoothing)
    return LossOutput(losses, *rewards)


@register("aot_unpaired", sorts_batch=True)
def aot_unpaired(x: PreferenceInputs, p: LossParams) -> LossOutput:
    """AOT (unpaired): sort chosen and rejected log-ratios independently, then a logistic loss per rank."""
    chosen_lr, rejected_lr = _logratios(x)
    delta = torch.sort(chosen_lr, dim=0)[0] - torch.sort(rejected_lr, dim=0)[0]
    return _out(_smoothed_sigmoid(p.beta * delta, p.label_smoothing), x, p)


@register("apo_zero")
def apo_zero(x: PreferenceInputs, p: LossParams) -> LossOutput:
    """APO-zero (Eq. 7): push chosen up and rejected down, 1 − σ(r_c) + σ(r_r)."""
    chosen_r, rejected_r = (p.beta * lr for lr in _logratios(x))
    return _out(1 - torch.sigmoid(chosen_r) + torch.sigmoid(rejected_r), x, p)


@register("apo_down")
def apo_down(x: PreferenceInputs, p: LossParams) -> LossOutput:
    """APO-down (Eq. 8): push both down, rejected more, σ(r_c) + 1 − σ(r_c − r_r)."""
    chosen_r, rejected_r = (p.beta * lr for lr in _logratios(x))
    return _out(torch.sigmoid(chosen_r) + 1 - torch.sigmoid(chosen_r - rejected_r), x, p)


@register("discopop", f_divergence=True)
def discopop(x: PreferenceInputs, p: LossParams) -> LossOutput:
    """DiscoPOP (Eq. 5): logistic and exponential losses blended by σ(z/τ)."""
    chosen, rejected = _scores(x, p)
    z = p.beta * (chosen - rejected)
    mix = torch.sigmoid(z / p.discopop_tau)
    return _out(-F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix, x, p)


@register("sigmoid_norm", f_divergence=True)
def sigmoid_norm(x: PreferenceInputs, p: LossParams) -> LossOutput:
    """DPO on per-token log-ratios: −log σ(β·(s_c/|y_c| − s_r/|y_r|))."""
    chosen, rejected = _scores(x, p)
    delta = _per_token(chosen, x.chosen_lengths, p) - _per_token(rejected, x.rejected_lengths, p)
    return _out(-F.logsigmoid(p.beta * delta), x, p)


# ---------------------------------------------------------------- reference-free losses


def _policy_rewards(chosen: Tensor, rejected: Tensor, p: LossParams) -> tuple[Tensor, Tensor]:
    return p.beta * chosen.detach(), p.beta * rejected.detach()


@register("sft", reference_free=True, f_divergence=True)
def sft(x: PreferenceInputs, p: LossParams) -> LossOutput:
    """NLL of the chosen completion. Rewards are DPO's when a reference is there, else β·policy log-probs."""
    if x.ref_chosen_logps is not None and x.ref_rejected_logps is not None:
        return _out(x.chosen_nll, x, p)
    return LossOutput(x.chosen_nll, *_policy_rewards(x.chosen_logps, x.rejected_logps, p))


@register("simpo", reference_free=True)
def simpo(x: PreferenceInputs, p: LossParams) -> LossOutput:
    """SimPO: −log σ(β·(avg_c − avg_r) − γ) on length-averaged log-probs (with cDPO smoothing, as TRL's CPO)."""
    chosen = _per_token(x.chosen_logps, x.chosen_lengths, p)
    rejected = _per_token(x.rejected_logps, x.rejected_lengths, p)
    losses = _smoothed_sigmoid(p.beta * (chosen - rejected) - p.simpo_gamma, p.label_smoothing)
    return LossOutput(losses, *_policy_rewards(chosen, rejected, p))


@register("orpo", reference_free=True)
def orpo(x: PreferenceInputs, p: LossParams) -> LossOutput:
    """ORPO: NLL − β·log σ(log odds(y_c) − log odds(y_r)), odds from length-averaged log-probs (β is λ)."""
    chosen = _per_token(x.chosen_logps, x.chosen_lengths, p).float()
    rejected = _per_token(x.rejected_logps, x.rejected_lengths, p).float()
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    losses = x.chosen_nll - p.beta * F.logsigmoid(log_odds)
    return LossOutput(losses, *_policy_rewards(chosen, rejected, p))


@register("cpo", reference_free=True)
def cpo(x: PreferenceInputs, p: LossParams) -> LossOutput:
    """CPO: −log σ(β·(logp_c − logp_r)) (cDPO-smoothed) + cpo_alpha·NLL of the chosen completion."""
    z = p.beta * (x.chosen_logps - x.rejected_logps)
    losses = _smoothed_sigmoid(z, p.label_smoothing) + p.cpo_alpha * x.chosen_nll
    return LossOutput(losses, *_policy_rewards(x.chosen_logps, x.rejected_logps, p))


# ---------------------------------------------------------------- combination


def dpop_penalised(x: PreferenceInputs, dpop_lambda: float) -> PreferenceInputs:
    """`x` with the chosen log-prob lowered by λ·max(0, s_ref,c − s_c) (DPOP; see the module docstring)."""
    if x.ref_chosen_logps is None:
        raise ValueError("DPOP needs reference log-probs but PreferenceInputs has none")
    penalty = dpop_lambda * torch.relu(x.ref_chosen_logps.detach() - x.chosen_logps)  # (B,)
    return dataclasses.replace(x, chosen_logps=x.chosen_logps - penalty)


def compute_preference_loss(inputs: PreferenceInputs, objective: Objective) -> LossOutput:
    """Σ_k weight_k · loss_k (+ rpo_alpha · NLL), times the WPO pair weight; rewards of the first loss. With DPOP the
    losses read the penalised chosen log-probs and the rewards are DPO's, from the unpenalised ones."""
    if not objective.losses:
        raise ValueError("an Objective needs at least one loss")
    scored = inputs if objective.dpop_lambda is None else dpop_penalised(inputs, objective.dpop_lambda)
    total: Tensor | None = None
    first: LossOutput | None = None
    for name, weight in objective.losses:
        if not LOSS_TRAITS[name].reference_free and inputs.ref_chosen_logps is None:
            raise ValueError(f"loss {name!r} needs a reference model but none was computed")
        out = LOSSES[name](scored, objective.params)
        total = weight * out.losses if total is None else total + weight * out.losses
        first = first or out
    assert total is not None and first is not None
    if objective.rpo_alpha is not None:
        total = total + objective.rpo_alpha * inputs.chosen_nll
    if objective.use_weighting:
        total = total * inputs.policy_weights
    if objective.dpop_lambda is not None:
        return LossOutput(total, *_dpo_rewards(inputs, objective.params))
    return LossOutput(total, first.chosen_rewards, first.rejected_rewards)
