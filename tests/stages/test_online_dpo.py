"""Online DPO's pair selection and loss against hand-derived values on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from prefalign.config import OnlineDPOConfig
from prefalign.model.reference import FrozenModelReference
from prefalign.rollout.sampling import CompletionGroups
from prefalign.stages.online_dpo import OnlineDPO, check_online_dpo_config, select_pairs
from prefalign.stages.rollout import ScoredRollout


def test_select_pairs_best_and_worst_with_ties_and_nan():
    # pairs of two: sample 2 wins; a tie keeps sample 1 as chosen (TRL's rule); sample 1 wins
    chosen, rejected = select_pairs(torch.tensor([1.0, 2.0, 3.0, 3.0, 2.0, -1.0]), 2)
    assert chosen.tolist() == [1, 2, 4] and rejected.tolist() == [0, 3, 5]
    # groups of three: NaN (unscored) is the worst; the first best is chosen, the last worst rejected
    chosen, rejected = select_pairs(torch.tensor([0.0, 5.0, math.nan, 5.0, 1.0, 1.0]), 3)
    assert chosen.tolist() == [1, 3] and rejected.tolist() == [2, 5]


def _rollout(prompts, completions, rewards, generations=2, truncated=None):
    """The scored rollout (groups of `generations` consecutive rows) of `completions`."""
    width = max(len(c) for c in completions)
    ids = torch.tensor([c + [0] * (width - len(c)) for c in completions])
    mask = (torch.arange(width)[None] < torch.tensor([len(c) for c in completions])[:, None]).long()
    groups = CompletionGroups(prompts[::generations], generations, ids, mask, pad_token_id=0)
    truncated = torch.tensor(truncated if truncated is not None else [False, True, False, False])
    return ScoredRollout(groups, truncated, mask, rewards, {})


def _micro_batch(algo, rollout, kept, packed):
    """The micro-batch of the whole rollout as the rollout stage's make_batch builds it: the model input of the
    pairs' rows (`forward_rows`), the per-row tensors of every row."""
    rows = range(len(rollout.groups))
    batch = rollout.groups.batch(algo.forward_rows(rows, kept), packed)
    return {**batch, **kept, "loss_mask": rollout.loss_mask}


def _seq_logp(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = model(ids).logits[0, :-1].log_softmax(-1)
    return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(completion))


def _algorithm(model_dir, generations=2, **flags):
    """Online DPO on the tiny model; the reference is the policy with noise, so the DPO margin is not 0."""
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in ref_model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    cfg = OnlineDPOConfig(model_name_or_path="m", dataset_name="d", output_dir="o", reward_funcs=["length:3"], beta=0.2,
                          per_device_train_batch_size=2, num_generations=generations, **flags)
    return OnlineDPO(cfg, check_online_dpo_config(cfg), policy, FrozenModelReference(ref_model)), policy, ref_model


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "shared_prompt"])
def test_loss_and_metrics_by_hand(tiny_model_dir, packed):
    """Two prompts x 2 samples, in padded rows and in the shared-prompt layout."""
    algo, policy, ref_model = _algorithm(tiny_model_dir, missing_eos_penalty=10.0)
    prompts = [[5, 6, 7], [5, 6, 7], [20, 21], [20, 21]]
    completions = [[8, 9, 2], [10, 11, 12, 13], [30, 2], [31, 32, 2]]
    rollout = _rollout(prompts, completions, torch.tensor([1.0, 5.0, 2.0, 2.0]))
    # scores: row 1 is the best but has no EOS, so the penalty makes it the worst; rows 2, 3 tie -> 2 chosen
    kept, metrics = algo.prepare(rollout)
    assert kept["pair_rank"].tolist() == [0, 1, 0, 1]
    assert metrics["objective/scores"] == pytest.approx((1 - 5 + 2 + 2) / 4)
    assert metrics["objective/scores_margin"] == pytest.approx(((1 + 5) + 0) / 2)
    assert metrics["val/contain_eos_token"] == pytest.approx(0.75)

    batch = _micro_batch(algo, rollout, kept, packed)
    if packed:  # each prompt once: 3 + 3 + 4 tokens, then 2 + 2 + 3
        assert batch["input_ids"].shape == (1, 17) and batch["target_mask"].shape[0] == 4
    loss, m = algo.loss(policy, batch)
    s = [_seq_logp(policy, p, c) for p, c in zip(prompts, completions)]
    r = [_seq_logp(ref_model, p, c) for p, c in zip(prompts, completions)]
    margins = [(s[0] - r[0]) - (s[1] - r[1]), (s[2] - r[2]) - (s[3] - r[3])]
    want = sum(-math.log(1 / (1 + math.exp(-0.2 * d))) for d in margins) / 2
    assert loss.item() == pytest.approx(want, rel=1e-5)
    close = {"rel": 1e-4, "abs": 1e-6}  # sums of ~-30 log-probs: float32 summation order
    assert m["rewards/chosen"].item() == pytest.approx(0.2 * ((s[0] - r[0]) + (s[2] - r[2])) / 2, **close)
    assert m["rewards/margins"].item() == pytest.approx(0.2 * sum(margins) / 2, **close)
    assert m["rewards/accuracies"].item() == sum(d > 0 for d in margins) / 2
    assert m["logps/rejected"].item() == pytest.approx((s[1] + s[3]) / 2, rel=1e-5)
    kl = [s[i] - r[i] for i in (0, 2, 1, 3)]
    assert m["objective/kl"].item() == pytest.approx(sum(kl) / 4, **close)
    assert m["objective/entropy"].item() == pytest.approx(-sum(s) / 4, rel=1e-5)
    scores = [1.0, 2.0, -5.0, 2.0]  # chosen rows then rejected, after the penalty
    assert m["objective/rlhf_reward"].item() == pytest.approx(sum(x - 0.2 * k for x, k in zip(scores, kl)) / 4,
                                                              **close)


def test_shared_prompt_pairs_equal_padded_rows(tiny_model_dir):
    """Four samples per prompt, chosen and rejected anywhere in the group (here rejected before chosen): the
    shared-prompt layout runs only the pairs' rows, each prompt once, and gives the padded rows' loss, metrics and
    gradients (float32; tolerance 1e-5 relative, from summation order inside attention)."""
    algo, policy, _ = _algorithm(tiny_model_dir, generations=4, rpo_alpha=1.0, mask_truncated_completions=True)
    prompts = [[5, 6, 7]] * 4 + [[20, 21, 22, 23]] * 4
    completions = [[8, 2], [9, 10, 2], [11, 2], [12, 13, 14, 2], [30, 2], [31, 2], [32, 33, 2], [34, 35]]
    rewards = torch.tensor([0.5, 0.0, 2.0, 1.0, 1.0, 3.0, -1.0, 0.0])
    rollout = _rollout(prompts, completions, rewards, 4, [False] * 6 + [True, False])  # pair 2 adds no loss
    kept, _ = algo.prepare(rollout)
    assert algo.forward_rows(range(8), kept) == [2, 5, 1, 6]  # chosen rows, then rejected, in prompt order
    results = {}
    for packed in (False, True):
        policy.zero_grad()
        loss, metrics = algo.loss(policy, _micro_batch(algo, rollout, kept, packed))
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
        results[packed] = (loss.detach(), {k: v.detach() for k, v in metrics.items()}, grads)
    (loss_a, m_a, g_a), (loss_b, m_b, g_b) = results[False], results[True]
    assert loss_b.item() == pytest.approx(loss_a.item(), rel=1e-5) and loss_a.item() > 0
    assert set(m_a) == set(m_b)
    for name in m_a:
        assert m_b[name].item() == pytest.approx(m_a[name].item(), rel=1e-5, abs=1e-6), name
    torch.testing.assert_close(g_b, g_a, rtol=1e-5, atol=1e-7)
