"""Our losses against TRL's own loss code on the same real model outputs.

TRL 1.16 inlines its DPO losses in `DPOTrainer._compute_loss` (there is no `dpo_loss` any more), so that method
is called unbound with a `SimpleNamespace` carrying the hyperparameters as `self`, a real `Accelerator` and two
real tiny Qwen2 models (the reference is the policy with seeded noise added to its weights), each given TRL's
fused LM head. Our side gets its token log-probs from a plain forward of the same models (log_softmax of the
logits), so the comparison covers the aggregation (sum, LD-DPO, WPO) as well as the loss formulas.
SimPO and CPO are compared with `CPOTrainer.cpo_loss`, ORPO with `ORPOTrainer.odds_ratio_loss`.
TRL's loss is the batch mean, so it is compared with the mean of our per-pair losses.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")

from accelerate import Accelerator  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from prefalign.config import DPOArgs  # noqa: E402
from prefalign.losses.aggregate import preference_inputs  # noqa: E402
from prefalign.losses.preference import compute_preference_loss  # noqa: E402
from prefalign.stages.dpo import preference_objective  # noqa: E402

# TRL's disable_gradient_checkpointing reads a transformers attribute deprecated in v5; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

FUSED_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


@dataclass
class Logps:
    """The fields of model.logprobs.CompletionLogps (that module is owned elsewhere)."""

    token_logps: torch.Tensor
    mask: torch.Tensor
    logits_mean_sum: torch.Tensor
    wpo_adjust: torch.Tensor | None


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    add_fused_lm_head(policy, outputs=FUSED_OUTPUTS)
    add_fused_lm_head(ref)
    return policy, ref


def make_batch(prompt_lens, chosen_lens, rejected_lens, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A right-padded [2B, T] batch in TRL's collator layout: chosen rows, then rejected rows."""
    gen = torch.Generator().manual_seed(seed)
    rows = [(p, c) for p, c in zip(prompt_lens, chosen_lens)] + [
        (p, r) for p, r in zip(prompt_lens, rejected_lens)
    ]
    width = max(p + c for p, c in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for i, (p, c) in enumerate(rows):
        ids[i, : p + c] = torch.randint(3, vocab, (p + c,), generator=gen)
        attention[i, : p + c] = 1
        completion[i, p : p + c] = 1
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


def our_logps(model, batch, with_wpo: bool) -> Logps:
    """Completion-token log-probs from a plain forward, left-aligned as model.logprobs promises."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # (2B, T-1, V)
    targets = batch["input_ids"][:, 1:]
    token = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (2B, T-1)
    adjust = torch.logsumexp(2 * logprobs, dim=-1)  # (2B, T-1)
    shift_mask = batch["completion_mask"][:, 1:].bool()
    width = int(shift_mask.sum(1).max())
    out_logps = torch.zeros(len(token), width)
    out_adjust = torch.zeros(len(token), width)
    out_mask = torch.zeros(len(token), width, dtype=torch.bool)
    for i in range(len(token)):
        n = int(shift_mask[i].sum())
        out_logps[i, :n] = token[i][shift_mask[i]]
        out_adjust[i, :n] = adjust[i][shift_mask[i]]
        out_mask[i, :n] = True
    return Logps(out_logps, out_mask, torch.zeros(len(token)), out_adjust if with_wpo else None)


def trl_dpo(models, batch, cfg: DPOArgs) -> tuple[float, dict[str, float]]:
    """TRL 1.16's DPO loss on `batch`, with `cfg`'s hyperparameters; returns (loss, logged metrics)."""
    policy, ref = models
    trainer = SimpleNamespace(
        model=policy,
        ref_model=ref,
        accelerator=Accelerator(cpu=True),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=cfg.discopop_tau),
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        beta=cfg.beta,
        loss_types=list(cfg.loss_type),
        loss_weights=cfg.loss_weights or [1.0] * len(cfg.loss_type),
        ld_alpha=cfg.ld_alpha,
        f_divergence_type=cfg.f_divergence_type,
        f_alpha_divergence_coef=cfg.f_alpha_divergence_coef,
        label_smoothing=cfg.label_smoothing,
        use_weighting=cfg.use_weighting,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    with torch.no_grad():
        loss = DPOTrainer._compute_loss(trainer, policy, dict(batch), return_outputs=False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def ours(models, batch, cfg: DPOArgs, bco_delta: float | None = None):
    policy, ref = models
    x = preference_inputs(our_logps(policy, batch, cfg.use_weighting), our_logps(ref, batch, False), preference_objective(cfg))
    if bco_delta is not None:
        x.bco_delta = torch.tensor(bco_delta)
    return x, compute_preference_loss(x, preference_objective(cfg))


# (prompt, chosen, rejected) lengths in tokens of each of three pairs.
VARIED = ((4, 6, 3), (5, 2, 7), (3, 8, 8))
EQUAL_CHOSEN = ((4, 5, 3), (5, 5, 7), (6, 5, 9))  # TRL's sft averages over all chosen tokens of the batch

DPO_CASES = [
    ("sigmoid", {}, VARIED),
    ("hinge", {}, VARIED),
    ("ipo", {}, VARIED),
    ("exo_pair", {"label_smoothing": 1e-3}, VARIED),
    ("nca_pair", {}, VARIED),
    ("robust", {"label_smoothing": 0.1}, VARIED),
    ("sppo_hard", {}, VARIED),
    ("aot", {"label_smoothing": 0.1}, VARIED),
    ("aot_unpaired", {"label_smoothing": 0.1}, VARIED),
    ("apo_zero", {}, VARIED),
    ("apo_down", {}, VARIED),
    ("discopop", {}, VARIED),
    ("sigmoid_norm", {}, VARIED),
    ("sft", {}, EQUAL_CHOSEN),
    ("sigmoid", {"beta": 0.5, "ld_alpha": 0.5}, VARIED),
    ("sigmoid", {"f_divergence_type": "forward_kl"}, VARIED),
    ("sigmoid", {"f_divergence_type": "js_divergence"}, VARIED),
    ("sigmoid", {"f_divergence_type": "alpha_divergence"}, VARIED),  # our default alpha, 0.5, is TRL's
    ("ipo", {"f_divergence_type": "forward_kl"}, VARIED),
    ("robust", {"label_smoothing": 0.2, "f_divergence_type": "js_divergence"}, VARIED),
]


@pytest.mark.parametrize(
    ("name", "extra", "lengths"), DPO_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(DPO_CASES)]
)
def test_dpo_losses_match_trl(models, name, extra, lengths):
    batch = make_batch(*zip(*lengths), vocab=models[0].config.vocab_size)
    cfg = DPOArgs(loss_type=[name], **extra)
    trl_loss, metrics = trl_dpo(models, batch, cfg)
    x, out = ours(models, batch, cfg)
    assert out.losses.mean().item() == pytest.approx(trl_loss, rel=1e-4, abs=1e-6)
    assert out.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], rel=1e-4, abs=1e-7)
    assert out.rejected_rewards.mean().item() == pytest.approx(
        metrics["rewards/rejected"], rel=1e-4, abs=1e-7
    )
    assert x.chosen_logps.mean().item() == pytest.approx(metrics["logps/chosen"], rel=1e-5)
    assert x.rejected_logps.mean().item() == pytest.approx(metrics["logps/rejected"], rel=1e-5)


def test_bco_pair_matches_trl_without_the_reward_shift(models):
    """TRL 1.16 dropped BCO's running-mean shift δ; with δ = 0 passed in, the values agree."""
    batch = make_batch(*zip(*VARIED), vocab=models[0].config.vocab_size)
    cfg = DPOArgs(loss_type=["bco_pair"])
    trl_loss, _ = trl_dpo(models, batch, cfg)
    _, out = ours(models, batch, cfg, bco_delta=0.0)
    assert out.losses.mean().item() == pytest.approx(trl_loss, rel=1e-4)
    _, shifted = ours(models, batch, cfg)  # default: δ = batch mean of the rewards
    assert shifted.losses.mean().item() != pytest.approx(trl_loss, rel=1e-4)


def test_weighted_mix_with_wpo_matches_trl(models):
    """MPO-style mix with WPO weights. TRL < 1.0 (and the WPO authors) clamp a pair's weight at 1; TRL 1.16 no
    longer does. So TRL's value is checked against the unclamped weights and ours against the clamped ones,
    on a batch where the clamp is active for some pairs. ("sft" is left out: TRL 1.16 raises a RuntimeError when
    it multiplies its expanded sft loss by the weights in place.)"""
    batch = make_batch(*zip(*VARIED), vocab=models[0].config.vocab_size)
    cfg = DPOArgs(loss_type=["sigmoid", "apo_zero"], loss_weights=[1.0, 0.3], use_weighting=True)
    trl_loss, _ = trl_dpo(models, batch, cfg)
    x, out = ours(models, batch, cfg)
    _, unweighted = ours(models, batch, DPOArgs(loss_type=cfg.loss_type, loss_weights=cfg.loss_weights))

    # exp(mean_t [log p(y_t) − log Σ_v p(v)²]) of chosen and rejected, multiplied, without a clamp.
    logps = our_logps(models[0], batch, with_wpo=True)
    aligned = torch.where(logps.mask, logps.token_logps - logps.wpo_adjust, 0.0)
    chosen, rejected = (aligned.sum(1) / logps.mask.sum(1)).chunk(2)
    raw = torch.exp(chosen + rejected)
    assert (raw > 1).any() and (raw < 1).any()
    torch.testing.assert_close(x.policy_weights, raw.clamp(max=1.0))
    assert (unweighted.losses * raw).mean().item() == pytest.approx(trl_loss, rel=1e-4)
    assert out.losses.mean().item() == pytest.approx((unweighted.losses * raw.clamp(max=1.0)).mean().item())


def test_rpo_term_matches_trl_sft_loss_type(models):
    """TRL 1.16 replaced rpo_alpha by the "sft" loss type: sigmoid + rpo_alpha·NLL == [sigmoid, sft] weighted."""
    batch = make_batch(*zip(*EQUAL_CHOSEN), vocab=models[0].config.vocab_size)
    trl_loss, _ = trl_dpo(models, batch, DPOArgs(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7]))
    _, out = ours(models, batch, DPOArgs(loss_type=["sigmoid"], rpo_alpha=0.7))
    assert out.losses.mean().item() == pytest.approx(trl_loss, rel=1e-4)


def _policy_inputs(models, lengths, **cfg):
    batch = make_batch(*zip(*lengths), vocab=models[0].config.vocab_size)
    return preference_inputs(our_logps(models[0], batch, False), None, preference_objective(DPOArgs(**cfg)))


@pytest.mark.parametrize(("name", "average"), [("simpo", True), ("cpo", False)])
def test_simpo_and_cpo_match_trl_cpo_loss(models, name, average):
    """CPOTrainer.cpo_loss: loss_type "simpo" on length-averaged log-probs, "sigmoid" (CPO) on sums."""
    from trl.experimental.cpo import CPOTrainer

    cfg = DPOArgs(loss_type=[name], beta=0.2, simpo_gamma=0.3, label_smoothing=0.1, cpo_alpha=0.0)
    x = _policy_inputs(models, VARIED)
    chosen, rejected = x.chosen_logps, x.rejected_logps
    if average:
        chosen, rejected = chosen / x.chosen_lengths, rejected / x.rejected_lengths
    trainer = SimpleNamespace(
        alpha=0.0,
        beta=cfg.beta,
        simpo_gamma=cfg.simpo_gamma,
        label_smoothing=cfg.label_smoothing,
        loss_type="simpo" if name == "simpo" else "sigmoid",
        accelerator=Accelerator(cpu=True),
    )
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trainer, chosen, rejected)
    out = compute_preference_loss(x, preference_objective(cfg))
    torch.testing.assert_close(out.losses, losses)
    torch.testing.assert_close(out.chosen_rewards, chosen_rewards)
    torch.testing.assert_close(out.rejected_rewards, rejected_rewards)
    # CPO adds cpo_alpha × NLL of the chosen completion on top.
    with_nll = compute_preference_loss(
        x, preference_objective(DPOArgs(loss_type=[name], beta=0.2, simpo_gamma=0.3, label_smoothing=0.1))
    )
    if name == "cpo":
        torch.testing.assert_close(with_nll.losses, losses + x.chosen_nll)


def test_orpo_matches_trl_odds_ratio_loss(models):
    """ORPO = NLL − ORPOTrainer.odds_ratio_loss (which returns β·log σ(log odds)) on length-averaged log-probs."""
    from trl.experimental.orpo import ORPOTrainer

    cfg = DPOArgs(loss_type=["orpo"], beta=0.25)
    x = _policy_inputs(models, VARIED)
    trainer = SimpleNamespace(beta=cfg.beta, accelerator=Accelerator(cpu=True))
    chosen, rejected = x.chosen_logps / x.chosen_lengths, x.rejected_logps / x.rejected_lengths
    ratio_losses, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(
        trainer, chosen, rejected
    )
    out = compute_preference_loss(x, preference_objective(cfg))
    torch.testing.assert_close(out.losses, x.chosen_nll - ratio_losses)
    torch.testing.assert_close(out.chosen_rewards, chosen_rewards)
    torch.testing.assert_close(out.rejected_rewards, rejected_rewards)
