"""token_divergences (chunked heads) against the plain full-logits computation, in values and gradients."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import build_model
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
