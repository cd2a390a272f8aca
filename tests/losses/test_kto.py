"""Unpaired losses (KTO, APO-zero-unpaired, BCO) against values derived by hand, and against TRL 1.16's own code.

Hand case: β = 0.5, three examples with policy logps −2, −3, −1 and reference −2.5, −2, −1, labels desirable,
undesirable, desirable; so log-ratios r = 0.5, −1, 0. KL point z = 0.2, λ_D = 2, λ_U = 0.5.

TRL: `KTOTrainer._compute_loss` is called unbound with a SimpleNamespace `self` (as tests/losses/test_trl_parity.py
does for DPO) on real tiny models (the reference is the policy with seeded noise added), with TRL's collator and its
+1-rolled KL completions. Our side runs the stage's own pieces on the same examples: `collate_padded_completions`,
`model.logprobs.completion_logps`, `kl_reference_point` and the registered loss.
"""

from __future__ import annotations

import math
from collections import defaultdict
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from prefalign.data.collate import collate_padded_completions
from prefalign.losses.kto import (
    UNPAIRED_LOSSES,
    RunningMean,
    UnpairedInputs,
    UnpairedParams,
    kl_reference_point,
)
from prefalign.model.logprobs import completion_logps
from prefalign.stages.kto import kl_partners

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def hand_inputs(**over) -> UnpairedInputs:
    t = torch.tensor
    fields = dict(logps=t([-2.0, -3.0, -1.0]), ref_logps=t([-2.5, -2.0, -1.0]), labels=t([True, False, True]),
                  kl=t(0.2))
    fields.update(over)
    return UnpairedInputs(**fields)


PARAMS = UnpairedParams(beta=0.5, desirable_weight=2.0, undesirable_weight=0.5)


def close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=1e-6, atol=1e-7)


def test_kto_by_hand():
    """Desirable 2·(1 − σ(0.5·(r − 0.2))), undesirable 0.5·(1 − σ(0.5·(0.2 − r)))."""
    out = UNPAIRED_LOSSES["kto"](hand_inputs(), PARAMS)
    close(out.losses, [2 * (1 - sig(0.15)), 0.5 * (1 - sig(0.6)), 2 * (1 - sig(-0.1))])
    close(out.rewards, [0.25, -0.5, 0.0])


def test_apo_zero_unpaired_by_hand_ignores_z():
    out = UNPAIRED_LOSSES["apo_zero_unpaired"](hand_inputs(kl=torch.tensor(7.0)), PARAMS)
    close(out.losses, [2 * (1 - sig(0.25)), 0.5 * sig(-0.5), 2 * (1 - sig(0.0))])


def test_bco_by_hand():
    """Rewards 0.25, −0.5, 0 shifted by δ = 0.1: −log σ(ρ − δ) desirable, −log σ(−(ρ − δ)) undesirable."""
    out = UNPAIRED_LOSSES["bco"](hand_inputs(delta=torch.tensor(0.1)), PARAMS)
    close(out.losses, [-2 * math.log(sig(0.15)), -0.5 * math.log(sig(0.6)), -2 * math.log(sig(-0.1))])
    with pytest.raises(ValueError, match="delta"):
        UNPAIRED_LOSSES["bco"](hand_inputs(), PARAMS)


def test_kl_point_is_a_clamped_mean_without_gradient_and_z_gets_none():
    diff = torch.tensor([0.3, -0.9], requires_grad=True)
    assert float(kl_reference_point(diff.sum(), 2)) == 0.0  # mean −0.3 clamps to 0
    z = kl_reference_point(torch.tensor([0.3, 0.5]).sum(), 2)
    assert float(z) == pytest.approx(0.4)
    assert not kl_reference_point(diff.sum(), 2).requires_grad
    logps = torch.tensor([-2.0, -3.0, -1.0], requires_grad=True)
    UNPAIRED_LOSSES["kto"](hand_inputs(logps=logps), PARAMS).losses.sum().backward()
    # d/ds of 2(1 − σ(β(r − z))) = −2β·σ'(β(r − z)), σ' = σ(1 − σ)
    assert float(logps.grad[0]) == pytest.approx(-2 * 0.5 * sig(0.15) * (1 - sig(0.15)), rel=1e-6)


def test_running_mean_and_partners():
    mean = RunningMean()
    mean.update(3.0, 2)  # rewards 1, 2
    mean.update(6.0, 1)  # reward 6: mean of 1, 2, 6 = 3
    assert mean.mean == pytest.approx(3.0) and mean.count == 3
    assert kl_partners([5, 2, 9]) == {5: 9, 2: 5, 9: 2}  # TRL's roll by one: the first takes the last's


# ---------------------------------------------------------------- against TRL's KTOTrainer._compute_loss


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits"))
    add_fused_lm_head(ref)
    return policy, ref


def make_examples(spec, vocab: int, seed: int = 1) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"prompt_ids": torch.randint(3, vocab, (p,), generator=gen).tolist(),
             "completion_ids": torch.randint(3, vocab, (c,), generator=gen).tolist(), "label": label}
            for p, c, label in spec]


def trl_kto(models, examples, loss_type, params: UnpairedParams) -> tuple[float, dict[str, float]]:
    from accelerate import Accelerator
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference, KTOTrainer

    policy, ref = models
    rolled = [dict(e) for e in examples]
    for e, j in zip(rolled, kl_partners(list(range(len(rolled)))).values()):
        e["KL_completion_ids"] = examples[j]["completion_ids"]
    batch = DataCollatorForUnpairedPreference(pad_token_id=0)(rolled)
    trainer = SimpleNamespace(
        model=policy, ref_model=ref, accelerator=Accelerator(cpu=True),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None), calculate_KL=loss_type == "kto",
        precompute_ref_logps=False, aux_loss_enabled=False, beta=params.beta, loss_type=loss_type,
        desirable_weight=params.desirable_weight, undesirable_weight=params.undesirable_weight,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    trainer._compute_kl_logps = partial(KTOTrainer._compute_kl_logps, trainer)
    with torch.no_grad():
        loss = KTOTrainer._compute_loss(trainer, policy, dict(batch), return_outputs=False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def ours(models, examples, loss_type, params: UnpairedParams) -> tuple[float, dict[str, float]]:
    policy, ref = models
    partner = kl_partners(list(range(len(examples))))
    items = [(e["prompt_ids"], [e["completion_ids"], examples[partner[i]]["completion_ids"]])
             for i, e in enumerate(examples)]
    batch = collate_padded_completions(items, pad_token_id=0)
    with torch.no_grad():
        pol = completion_logps(policy, batch, with_entropy=True)
        ref_sums = completion_logps(ref, batch).token_logps.sum(-1)
    n = len(examples)
    sums = pol.token_logps.sum(-1)
    kl = kl_reference_point((sums[n:] - ref_sums[n:]).sum(), n) if loss_type == "kto" else torch.tensor(0.0)
    labels = torch.tensor([e["label"] for e in examples])
    out = UNPAIRED_LOSSES[loss_type](UnpairedInputs(sums[:n], ref_sums[:n], labels, kl), params)
    tokens, means = pol.mask[:n].sum(-1).float(), pol.logits_mean_sum[:n]
    metrics = {"kl": float(kl), "entropy": float(pol.entropy[:n].sum() / tokens.sum())}
    for name, rows in (("chosen", labels), ("rejected", ~labels)):
        if rows.any():
            metrics[f"rewards/{name}"] = float(out.rewards[rows].mean())
            metrics[f"logps/{name}"] = float(sums[:n][rows].mean())
            metrics[f"logits/{name}"] = float(means[rows].sum() / tokens[rows].sum())
    if labels.any() and (~labels).any():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return float(out.losses.mean()), metrics


# (prompt tokens, completion tokens, desirable) per example
MIXED = ((4, 3, True), (5, 6, False), (3, 2, True), (6, 4, False))
CASES = [
    ("kto", MIXED, UnpairedParams(0.1, 1.3, 0.7), 1),
    ("kto", MIXED, UnpairedParams(0.5, 1.0, 1.0), 2),
    ("kto", ((4, 3, True), (5, 6, True), (2, 7, True)), UnpairedParams(0.1, 1.0, 1.0), 3),  # all desirable
    ("kto", ((3, 5, False), (6, 2, False)), UnpairedParams(0.2, 1.0, 2.0), 4),  # all undesirable
    ("apo_zero_unpaired", MIXED, UnpairedParams(0.1, 1.3, 0.7), 1),
]


@pytest.mark.parametrize(("loss_type", "spec", "params", "seed"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_matches_trl_kto_trainer(models, loss_type, spec, params, seed):
    examples = make_examples(spec, models[0].config.vocab_size, seed)
    trl_loss, trl_metrics = trl_kto(models, examples, loss_type, params)
    loss, metrics = ours(models, examples, loss_type, params)
    assert loss == pytest.approx(trl_loss, rel=1e-5)
    trl_metrics.pop("num_tokens")
    assert set(metrics) == set(trl_metrics)  # e.g. no rejected metrics and no margins for an all-desirable batch
    for key, value in trl_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_negative_kl_is_clamped_like_trl(models):
    """A case where the mismatched pairs' raw mean log-ratio is negative: both sides log kl = 0."""
    for seed in range(10):
        examples = make_examples(MIXED, models[0].config.vocab_size, seed)
        policy, ref = models
        partner = kl_partners(list(range(4)))
        batch = collate_padded_completions([(e["prompt_ids"], [examples[partner[i]]["completion_ids"]])
                                            for i, e in enumerate(examples)], 0)
        with torch.no_grad():
            raw = float((completion_logps(policy, batch).token_logps.sum(-1)
                         - completion_logps(ref, batch).token_logps.sum(-1)).mean())
        if raw < 0:
            break
    else:
        pytest.fail("no seed gave a negative raw KL")
    trl_loss, trl_metrics = trl_kto(models, examples, "kto", UnpairedParams())
    loss, metrics = ours(models, examples, "kto", UnpairedParams())
    assert trl_metrics["kl"] == metrics["kl"] == 0.0
    assert loss == pytest.approx(trl_loss, rel=1e-5)
