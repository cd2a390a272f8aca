"""Padded batches: preference pairs as two rows each (`collate_padded`), causal-LM rows of segments (`collate_rows`).

Preference pairs: every pair becomes two rows, prompt+chosen and prompt+rejected.

This is the simplest layout and the one every model supports. It runs each prompt twice and pads every row
to the longest one; `data.packing` provides the leaner packed / shared-prompt layouts. The contract is in
docs/DESIGN.md ("Batches"): rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected, right-padded, and
`completion_mask` is 1 exactly where the token at that position is a scored completion token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from prefalign.data.types import Segments, TokenizedPair


def collate_padded(pairs: list[TokenizedPair], pad_token_id: int) -> dict[str, Any]:
    """Stack `pairs` into one right-padded batch of 2B rows (chosen rows first, then rejected rows)."""
    if not pairs:
        raise ValueError("collate_padded needs at least one pair")
    batch = collate_padded_completions([(p.prompt_ids, (p.chosen_ids, p.rejected_ids)) for p in pairs], pad_token_id)
    batch["num_pairs"] = len(pairs)
    return batch


def collate_padded_completions(items: Sequence[tuple[list[int], Sequence[list[int]]]],
                               pad_token_id: int) -> dict[str, Any]:
    """Right-padded rows prompt + completion for `items` of (prompt ids, K completions): K·B rows, completion-major
    (row k·B + i is item i's k-th completion), so that pairs give chosen rows first, then rejected rows."""
    if not items:
        raise ValueError("collate_padded_completions needs at least one item")
    k = len(items[0][1])
    if any(len(c) != k for _, c in items):
        raise ValueError("every item needs the same number of completions")
    prompts = [list(p) for p, _ in items] * k
    completions = [list(c[j]) for j in range(k) for _, c in items]
    rows = [prompt + completion for prompt, completion in zip(prompts, completions)]
    width = max(len(r) for r in rows)

    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (K·B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (K·B, T)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (K·B, T)
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, :len(row)] = 1
        completion_mask[i, len(prompt):len(row)] = 1
    return {
        "layout": "padded",
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
    }


def padded_row_images(pairs: list[TokenizedPair]) -> list[Any]:
    """The images of a padded batch in the order their tokens appear: each prompt sits in a chosen and a rejected
    row, so every image comes twice (chosen rows' images, then the same for the rejected rows), as TRL feeds them."""
    images = [image for p in pairs for image in p.images]
    return images + images


def collate_rows(rows: Sequence[Segments], pad_token_id: int, segmented: bool) -> dict[str, Any]:
    """input_ids / labels / position_ids (B, T); `attention_mask` only when not segmented (see module docstring)."""
    width = max(sum(len(s.input_ids) for s in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)  # (B, T): -100 = not a target
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for r, row in enumerate(rows):
        t = 0
        for seg in row:
            n = len(seg.input_ids)
            ids = torch.tensor(seg.input_ids, dtype=torch.long)
            input_ids[r, t:t + n] = ids
            labels[r, t:t + n] = torch.where(torch.tensor(seg.loss_mask), ids, -100)
            # one sequence when not segmented: positions continue across the row's segments
            position_ids[r, t:t + n] = torch.arange(n) if segmented else torch.arange(t, t + n)
            t += n
        attention_mask[r, :t] = 1
        position_ids[r, t:] = torch.arange(width - t)  # the padding: a segment of its own
    batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                             "num_tokens": int(attention_mask.sum())}
    if not segmented:
        batch["attention_mask"] = attention_mask
    return batch
