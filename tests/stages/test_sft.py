"""The causal-LM step of SFT/pretraining: packing leaves the loss unchanged, NEFTune only touches training."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import conv
from prefalign.config import SFTConfig
from prefalign.data.collate import collate_rows
from prefalign.data.packing import next_fit, pack_rows
from prefalign.data.sft import tokenize_sft
from prefalign.data.types import SFTExample, TokenizedSample
from prefalign.stages.causal_lm import CausalLMStage, add_neftune, lm_loss


@pytest.fixture(scope="module")
def samples(tiny_tokenizer) -> list[TokenizedSample]:
    exs = [SFTExample("a", messages=conv(("user", "hello"), ("assistant", "hi there"), ("user", "two plus two"),
                                         ("assistant", "four"))),
           SFTExample("b", prompt="the cat", text=" is blue"),
           SFTExample("c", text="the sky is green and the dog is red"),
           SFTExample("d", messages=conv(("user", "what is the capital of france"), ("assistant", "paris")))]
    return tokenize_sft(exs, tiny_tokenizer, SFTConfig())[0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked(tiny_model_dir, tiny_tokenizer, samples, attn):
    """Same targets, same contexts: the summed token losses must agree to float precision, while a plain
    concatenation (attention across samples) must not."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    pad = tiny_tokenizer.pad_token_id
    rows = [[s] for s in samples]
    unpacked = collate_rows(rows, pad, segmented=False)
    packed_rows = pack_rows(rows, max_length=70)
    assert len(packed_rows) < len(rows)  # really packed: several samples share a row
    packed = collate_rows(packed_rows, pad, segmented=True)
    assert "attention_mask" not in packed
    loss_u, m_u = lm_loss(model, unpacked)
    loss_p, m_p = lm_loss(model, packed)
    assert m_u["loss"][1] == m_p["loss"][1] == sum(s.num_loss_tokens for s in samples)
    assert loss_p.item() == pytest.approx(loss_u.item(), rel=1e-5)
    assert m_p["mean_token_accuracy"] == m_u["mean_token_accuracy"]
    grads = []
    for batch in (unpacked, packed):
        model.zero_grad()
        lm_loss(model, batch)[0].backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    concatenated = collate_rows(packed_rows, pad, segmented=False)
    assert abs(lm_loss(model, concatenated)[0].item() - loss_u.item()) > 1e-3


def test_loss_is_the_hand_computed_cross_entropy(tiny_model_dir, samples):
    """Sum over targets of -log softmax(logits[t-1])[token t], computed from the plain full-logits forward."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    s = samples[1]
    ids = torch.tensor([s.input_ids])
    logps = model(ids).logits[0].log_softmax(-1)
    expected = -sum(logps[t - 1, s.input_ids[t]].item() for t in range(1, len(s.input_ids)) if s.loss_mask[t])
    loss, metrics = lm_loss(model, collate_rows([[s]], 0, segmented=False))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["loss"][1] == s.num_loss_tokens


def test_packed_groups_hold_batch_size_sequences(samples, tiny_tokenizer):
    assert next_fit([5, 5, 5, 2], 10) == [[0, 1], [2, 3]]
    assert next_fit([12, 3], 10) == [[0], [1]]  # an item longer than the budget gets a bin of its own
    stage = CausalLMStage([[s] for s in samples], None, tiny_tokenizer.pad_token_id, batch_size=1,
                          eval_batch_size=1, seed=0, pack=True, segmented=True, max_length=70)
    groups = stage.train_groups(0)
    assert sorted(i for g in groups for i in g) == list(range(len(samples)))
    for g in groups:
        batch = stage.make_batch(g, "train")
        assert batch["input_ids"].shape[0] == 1 and batch["input_ids"].shape[1] <= 70
        assert stage.batch_weight(g, "train") == (batch["labels"] != -100).sum().item()


def test_neftune_noise_is_bounded_and_only_in_training(tiny_model_dir):
    """TRL's NEFTune: uniform noise in [-a, a], a = alpha / sqrt(L * d), on the embeddings in training only."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    emb = model.get_input_embeddings()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    clean = emb(ids)
    handle = add_neftune(model, alpha=5.0)
    model.train()
    noisy = emb(ids)
    bound = 5.0 / math.sqrt(6 * clean.shape[-1])
    diff = (noisy - clean).abs()
    assert diff.max() <= bound + 1e-7 and diff.max() > bound / 2  # uniform noise reaches near its bound
    model.eval()
    torch.testing.assert_close(emb(ids), clean)
    handle.remove()
