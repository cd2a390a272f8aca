"""Per-token divergences between a student and a teacher over the full vocabulary, chunk by chunk.

Distillation compares the two models' whole next-token distributions at every completion position. Holding both
models' [batch, seq, vocab] logits (and the student's float32 log-softmax saved for backward) is what makes naive
GKD run out of memory on large vocabularies. Here, as in `model.logprobs`:

1. each model runs its own forward with `logits_to_keep=1` and its final hidden states are captured;
2. the hidden states at the positions that predict completion tokens are gathered ([N, H] per model);
3. `chunk_size` positions at a time, both LM heads run and `divergence(student_logits, teacher_logits)` gives
   one value per position; the chunk runs under `torch.utils.checkpoint`, so backward recomputes its two
   [chunk, V] logits instead of keeping them (the teacher's head is recomputed without grad).

So at most one chunk's [chunk, V] logits of each model exist at a time. Models whose head `model.logprobs` cannot
reproduce fall back to their full forward's logits at the same positions (correct, not memory-lean).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from prefalign.model.logprobs import backbone_hidden, head_chunk_size, head_logits, resolve_head

Divergence = Callable[[Tensor, Tensor], Tensor]  # (n, V) student, (n, V) teacher -> (n,)


def _hidden_and_head(model: nn.Module, kwargs: dict[str, Any], rows: Tensor,
                     cols: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """[N, H] hidden states (or [N, V] logits for the fallback) at (rows, cols) and the function giving logits."""
    head = resolve_head(model)
    if head is None:
        return model(**kwargs, use_cache=False).logits[rows, cols], lambda x: x.float()
    return backbone_hidden(model, head, kwargs)[rows, cols], lambda h: head_logits(head, h)


def token_divergences(student: nn.Module, teacher: nn.Module, batch: dict[str, Any], divergence: Divergence, *,
                      chunk_size: int = 512) -> Tensor:
    """Divergence at each completion token of a padded-layout `batch` (input_ids, attention_mask, completion_mask),
    flat (N,) in row-major order; differentiable in the student's parameters, the teacher runs without grad."""
    completion = batch["completion_mask"].bool()  # (B, T)
    rows, cols = completion.nonzero(as_tuple=True)
    cols = cols - 1  # position t-1 predicts token t
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    s_in, s_logits = _hidden_and_head(student, kwargs, rows, cols)
    with torch.no_grad():
        t_in, t_logits = _hidden_and_head(teacher, kwargs, rows, cols)

    def chunk(s: Tensor, t: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_logits = t_logits(t)  # (n, V)
        return divergence(s_logits(s), teacher_logits)  # (n,)

    recompute = torch.is_grad_enabled() and s_in.requires_grad
    chunk_size = head_chunk_size(resolve_head(student), chunk_size)  # the two vocabularies are the same
    parts = []
    for start in range(0, s_in.size(0), chunk_size):
        s, t = s_in[start : start + chunk_size], t_in[start : start + chunk_size]
        parts.append(checkpoint(chunk, s, t, use_reentrant=False) if recompute else chunk(s, t))
    if not parts:
        return s_in.new_zeros(0, dtype=torch.float32) + s_in.sum() * 0  # keeps the graph for an empty batch
    return torch.cat(parts)
