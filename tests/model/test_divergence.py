"""token_divergences (chunked heads) against the plain full-logits computation, in values and gradients."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from helpers import build_model, peak_bytes
from prefalign.losses.distill import generalized_jsd
from prefalign.model.divergence import token_divergences
from prefalign.rollout.sampling import padded_layout


@pytest.fixture(scope="module")
def models(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    teacher_dir = tmp_path_factory.mktemp("teacher")
    teacher = build_model(teacher_dir, tiny_tokenizer, hidden_size=64, seed=3).eval()
    return student, teacher


def _batch() -> dict:
    prompts = [[5, 6, 7], [20], [30, 31, 32, 33]]
    completions = torch.tensor([[8, 9, 0, 0], [21, 22, 23, 24], [35, 0, 0, 0]])
    mask = (completions != 0).long()
    return padded_layout(prompts, completions, mask, pad=0)


def _naive(student, teacher, batch, beta: float) -> torch.Tensor:
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    s = student(**kwargs).logits[:, :-1]  # (B, T-1, V): position t-1 predicts t
    with torch.no_grad():
        t = teacher(**kwargs).logits[:, :-1]
    keep = batch["completion_mask"][:, 1:].bool()
    return generalized_jsd(s[keep], t[keep], beta=beta)  # (N,) row-major


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_equals_full_logits_in_values_and_gradients(models, beta):
    student, teacher = models
    batch = _batch()
    div = functools.partial(generalized_jsd, beta=beta)
    want = _naive(student, teacher, batch, beta)
    (g_want,) = torch.autograd.grad(want.sum(), [student.model.embed_tokens.weight])
    got = token_divergences(student, teacher, batch, div, chunk_size=2)  # 7 tokens: 4 chunks
    (g_got,) = torch.autograd.grad(got.sum(), [student.model.embed_tokens.weight])
    assert got.shape == (7,) and (got > 0).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)
    assert not any(p.grad is not None for p in teacher.parameters())


def test_same_model_gives_zero(models):
    student, _ = models
    got = token_divergences(student, student, _batch(), functools.partial(generalized_jsd, beta=0.5))
    assert got.abs().max().item() < 1e-6


def _qwen(vocab: int, seed: int) -> torch.nn.Module:
    config = transformers.Qwen2Config(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def _backward(fn, student, teacher, batch, div, chunk) -> None:
    fn(student, teacher, batch, div, chunk_size=chunk).sum().backward()


def _naive_divergences(student, teacher, batch, div, chunk_size) -> torch.Tensor:
    return _naive(student, teacher, batch, div.keywords["beta"])


@pytest.mark.slow
def test_peak_memory_holds_no_full_vocabulary_logits():
    """Quadrupling the vocabulary grows the peak by far less than one [positions, dV] float32 tensor, while the
    naive computation (both models' full logits) grows by several of them."""
    div = functools.partial(generalized_jsd, beta=0.5)
    seq, chunk = 256, 32
    peaks = {}
    for vocab in (1000, 5000):
        student, teacher = _qwen(vocab, 0), _qwen(vocab, 1)
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, vocab, (8,), generator=gen).tolist() for _ in range(4)]
        completions = torch.randint(3, vocab, (4, seq - 8), generator=gen)
        batch = padded_layout(prompts, completions, torch.ones_like(completions), pad=0)
        models = (student, teacher, batch)
        peaks[vocab] = (peak_bytes(_backward, token_divergences, *models, div, chunk),
                        peak_bytes(_backward, _naive_divergences, *models, div, chunk))
    positions, d_vocab = 4 * (seq - 8), 4000
    one_logits = positions * d_vocab * 4  # 15.9 MB
    lean_growth, naive_growth = (peaks[5000][i] - peaks[1000][i] for i in (0, 1))
    assert naive_growth > 2 * one_logits, (naive_growth, one_logits)  # the measure sees both models' logits
    # the divergence's temporaries of one chunk (about ten [chunk, V] float32 tensors) and the [V, H] gradients of
    # the student's embedding and head, never a [positions, V] tensor
    allowed = 12 * chunk * d_vocab * 4 + 2 * d_vocab * 16 * 4  # 6.1 MB + 0.5 MB
    assert lean_growth < allowed < one_logits / 2, (lean_growth, allowed, one_logits)
