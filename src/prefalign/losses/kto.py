"""Losses on unpaired feedback (KTO and relatives): pure functions of sequence log-probs, registered by name.

Each example is one completion with a label (desirable or not); its log-ratio is r = s − s_ref, with s the sum of
its completion-token log-probs under the policy and s_ref under the reference, and its implicit reward β·r (TRL's
`rewards/chosen` / `rewards/rejected`). A loss takes `UnpairedInputs` (one value per example, `[N]`) and
`UnpairedParams` and returns per-example losses, already multiplied by desirable_weight (λ_D) or
undesirable_weight (λ_U), plus the rewards. The caller divides the sum by the number of examples, so a batch's loss
is (λ_D Σ_D ℓ + λ_U Σ_U ℓ) / (n_D + n_U), TRL's `nanmean` of the weighted losses.

- `kto` (KTO paper Eq. 7, TRL 1.16's KTOTrainer): desirable 1 − σ(β(r − z)), undesirable 1 − σ(β(z − r)), with z
  the KL reference point (`kl_reference_point`): the mean policy-minus-reference log-ratio of mismatched
  (prompt, completion) pairs, without gradient, clamped at 0.
- `apo_zero_unpaired` (APO paper, unpaired Eq. 7 as TRL has it): desirable 1 − σ(βr), undesirable σ(βr); no z.
- `bco` (BCO, the last TRL that had it, 1.10.dev's BCOTrainer, without its optional UDM density ratio):
  desirable −log σ(βr − δ), undesirable −log σ(−(βr − δ)), δ a running mean of past rewards kept by the caller.
  TRL had no λ weights in BCO; here they apply as in KTO (with the defaults 1 nothing changes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class UnpairedInputs:
    """Per-example quantities every unpaired loss is computed from."""

    logps: Tensor
    """(N,) policy sequence log-probs (sums over completion tokens), with gradient."""
    ref_logps: Tensor
    """(N,) the same under the reference."""
    labels: Tensor
    """(N,) bool, True where the completion is desirable."""
    kl: Tensor
    """() KTO's reference point z (detached, >= 0); zeros for losses that do not use it."""
    delta: Tensor | None = None
    """() BCO's reward shift δ (detached); None for the others."""


@dataclass(frozen=True)
class UnpairedParams:
    """The hyper-parameters the unpaired losses read (TRL's names; see config.preference.KTOArgs)."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


@dataclass
class UnpairedLossOutput:
    losses: Tensor  # (N,) per-example loss, times λ_D or λ_U
    rewards: Tensor  # (N,) β·r, detached


@dataclass(frozen=True)
class UnpairedTraits:
    uses_kl: bool = False
    """The loss reads the KL reference point z, so the mismatched pairs must be scored."""
    uses_delta: bool = False
    """The loss reads a running reward shift δ that the caller keeps."""


UnpairedLossFn = Callable[[UnpairedInputs, UnpairedParams], UnpairedLossOutput]
UNPAIRED_LOSSES: dict[str, UnpairedLossFn] = {}
UNPAIRED_TRAITS: dict[str, UnpairedTraits] = {}


def register(name: str, **traits: bool) -> Callable[[UnpairedLossFn], UnpairedLossFn]:
    """Add a loss to `UNPAIRED_LOSSES` under `name` (traits: uses_kl, uses_delta)."""

    def deco(fn: UnpairedLossFn) -> UnpairedLossFn:
        UNPAIRED_LOSSES[name] = fn
        UNPAIRED_TRAITS[name] = UnpairedTraits(**traits)
        return fn

    return deco


def kl_reference_point(kl_sum: Tensor, count: Tensor | float) -> Tensor:
    """z = max(0, Σ (s − s_ref) over the mismatched pairs / their number), without gradient (KTO's KL estimate)."""
    return (kl_sum.detach() / count).clamp(min=0)


def _weighted(x: UnpairedInputs, p: UnpairedParams, desirable: Tensor, undesirable: Tensor) -> Tensor:
    return torch.where(x.labels, p.desirable_weight * desirable, p.undesirable_weight * undesirable)


def _logratios(x: UnpairedInputs) -> Tensor:
    return x.logps - x.ref_logps.detach()  # (N,)


@register("kto", uses_kl=True)
def kto(x: UnpairedInputs, p: UnpairedParams) -> UnpairedLossOutput:
    """KTO: 1 − σ(β(r − z)) for desirable, 1 − σ(β(z − r)) for undesirable examples."""
    r = _logratios(x)
    z = x.kl.detach()
    losses = _weighted(x, p, 1 - torch.sigmoid(p.beta * (r - z)), 1 - torch.sigmoid(p.beta * (z - r)))
    return UnpairedLossOutput(losses, p.beta * r.detach())


@register("apo_zero_unpaired")
def apo_zero_unpaired(x: UnpairedInputs, p: UnpairedParams) -> UnpairedLossOutput:
    """APO-zero, unpaired: 1 − σ(βr) for desirable (push up), σ(βr) for undesirable (push down)."""
    r = _logratios(x)
    losses = _weighted(x, p, 1 - torch.sigmoid(p.beta * r), torch.sigmoid(p.beta * r))
    return UnpairedLossOutput(losses, p.beta * r.detach())


@register("bco", uses_delta=True)
def bco(x: UnpairedInputs, p: UnpairedParams) -> UnpairedLossOutput:
    """BCO: a logistic classifier of desirable vs undesirable on the reward shifted by δ."""
    if x.delta is None:
        raise ValueError("bco needs UnpairedInputs.delta (a running mean of the rewards)")
    rewards = p.beta * _logratios(x)
    shifted = rewards - x.delta.detach()
    losses = _weighted(x, p, -F.logsigmoid(shifted), -F.logsigmoid(-shifted))
    return UnpairedLossOutput(losses, rewards.detach())


class RunningMean:
    """BCO's δ: the mean of every reward seen so far (`update` with one optimizer step's sum and count)."""

    def __init__(self, mean: float = 0.0, count: float = 0.0) -> None:
        self.mean, self.count = mean, count

    def update(self, total: float, count: float) -> None:
        if count <= 0:
            return
        new_count = self.count + count
        self.mean += (total / count - self.mean) * count / new_count
        self.count = new_count

    def state(self) -> dict[str, float]:
        return {"mean": self.mean, "count": self.count}
