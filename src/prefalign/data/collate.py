"""Padded preference batches: every pair becomes two rows, prompt+chosen and prompt+rejected.

This is the simplest layout and the one every model supports. It runs each prompt twice and pads every row
to the longest one; `data.packing` provides the leaner packed / shared-prompt layouts. The contract is in
docs/DESIGN.md ("Batches"): rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected, right-padded, and
`completion_mask` is 1 exactly where the token at that position is a scored completion token.
"""

from __future__ import annotations

from typing import Any

import torch

from prefalign.data.types import TokenizedPair


def collate_padded(pairs: list[TokenizedPair], pad_token_id: int) -> dict[str, Any]:
    """Stack `pairs` into one right-padded batch of 2B rows (chosen rows first, then rejected rows)."""
    if not pairs:
        raise ValueError("collate_padded needs at least one pair")
    prompts = [p.prompt_ids for p in pairs]
    completions = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    rows = [list(prompt) + list(completion) for prompt, completion in zip(prompts + prompts, completions)]
    width = max(len(r) for r in rows)

    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (2B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (2B, T)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (2B, T)
    for i, (prompt, completion) in enumerate(zip(prompts + prompts, completions)):
        n_prompt, n_total = len(prompt), len(prompt) + len(completion)
        input_ids[i, :n_total] = torch.tensor(rows[i], dtype=torch.long)
        attention_mask[i, :n_total] = 1
        completion_mask[i, n_prompt:n_total] = 1
    return {
        "layout": "padded",
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "num_pairs": len(pairs),
    }
