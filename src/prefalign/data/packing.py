"""Padding-free preference batches: all pairs of a micro-batch in one row, each prompt run once.

Every peer (TRL, OpenRLHF, LLaMA-Factory, torchtune, MiniMind) feeds a pair as two padded rows, prompt+chosen
and prompt+rejected, so the shared prompt goes through the model twice and the pad tokens cost as much as real
ones. Here a micro-batch is ONE row of concatenated pairs and nothing else:

- `share_prompt=True`: each pair is `prompt + chosen + rejected`. The rejected tokens' position ids restart at
  len(prompt), and they attend to the prompt and to themselves but not to chosen, so every completion token sees
  exactly the context it would see in its own padded row. That is two attention blocks per pair:
  `[prompt+chosen]` (causal) and `[rejected]` (causal, plus the prompt as a fully visible prefix).
- `share_prompt=False`: `prompt+chosen` and `prompt+rejected` are two independent packed documents.

The batch describes that structure with `attn_blocks` rows `(q_start, q_end, prefix_start, prefix_end)`: the
query tokens `[q_start, q_end)` attend causally among themselves and fully to `[prefix_start, prefix_end)`
(an empty range when there is no prefix). Blocks tile the row in order. `model.packed` turns them into
attention; any layout that can be written this way runs through the same forward.

Completion tokens are scored through `logit_index`: for each completion token, the row position whose hidden
state predicts it (the previous token of its own sequence; for the first token, the last prompt token, which
chosen and rejected share). Rows of `logit_index` / `target_ids` / `target_mask` are chosen pairs then
rejected pairs, completion tokens left-aligned, as in `model.logprobs.CompletionLogps`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from prefalign.data.types import Segments, TokenizedPair
from prefalign.errors import PrefalignError


def pair_cost(pair: TokenizedPair, share_prompt: bool) -> int:
    """Tokens that `pair` occupies in a packed row (the prompt once when shared, twice otherwise)."""
    prompt = len(pair.prompt_ids) * (1 if share_prompt else 2)
    return prompt + len(pair.chosen_ids) + len(pair.rejected_ids)


def pack_pairs(pairs: list[TokenizedPair], *, max_tokens_per_batch: int, share_prompt: bool) -> list[list[int]]:
    """Group pair indices into micro-batches of at most `max_tokens_per_batch` packed tokens.

    Next-fit in the given order: a micro-batch is closed as soon as the next pair does not fit, so the order
    the sampler chose (its shuffling) is kept exactly and the result is deterministic. A pair is never split;
    a pair longer than the budget on its own gets a micro-batch to itself (truncation is `data.tokenize`'s job).
    """
    if max_tokens_per_batch < 1:
        raise ValueError(f"max_tokens_per_batch must be positive, got {max_tokens_per_batch}")
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, pair in enumerate(pairs):
        cost = pair_cost(pair, share_prompt)
        if current and used + cost > max_tokens_per_batch:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += cost
    if current:
        batches.append(current)
    return batches


def collate_packed(pairs: list[TokenizedPair], pad_token_id: int, share_prompt: bool) -> dict[str, Any]:
    """One padding-free row holding every pair of the micro-batch (see the module docstring for the keys)."""
    if not pairs:
        raise ValueError("collate_packed needs at least one pair")
    items = [(p.prompt_ids, (p.chosen_ids, p.rejected_ids), p.source) for p in pairs]
    return {**collate_packed_completions(items, pad_token_id, share_prompt), "num_pairs": len(pairs)}


def collate_packed_completions(items: Sequence[tuple[Sequence[int], Sequence[Sequence[int]], str | None]],
                               pad_token_id: int, share_prompt: bool) -> dict[str, Any]:
    """The packed row of `items` (prompt ids, K completions, source), each a completion group (`collate_groups`)
    when `share_prompt`, else K one-completion groups. Rows of `logit_index` / `target_*` are completion-major
    (row k·B + i is item i's k-th completion), so pairs give chosen rows first, then rejected rows."""
    k = len(items[0][1])
    if any(len(c) != k for _, c, _ in items):
        raise ValueError("every item needs the same number of completions")
    if share_prompt:
        groups = [CompletionGroup(p, tuple(cs), src) for p, cs, src in items]
    else:
        groups = [CompletionGroup(p, (c,), src) for p, cs, src in items for c in cs]
    # Both layouts build item i's k-th completion as the (i·K + k)-th row.
    order = [i * k + j for j in range(k) for i in range(len(items))]
    return {**collate_groups(groups, pad_token_id, row_order=order), "share_prompt": share_prompt}


@dataclass(frozen=True)
class CompletionGroup:
    """Completions that continue one prompt: a preference pair, or the G samples of a prompt in on-policy RL."""

    prompt_ids: Sequence[int]
    completions: Sequence[Sequence[int]]
    source: str | None = None  # where the prompt came from, for the error about an empty prompt


def _result_rows(num_rows: int, row_order: Sequence[int] | None) -> list[int]:
    """slot[k]: the result row of the k-th completion built (group order), the inverse of `row_order`."""
    if row_order is None:
        return list(range(num_rows))
    slot = [0] * num_rows
    for out_row, built in enumerate(row_order):
        slot[built] = out_row
    return slot


def collate_groups(groups: Sequence[CompletionGroup], pad_token_id: int,
                   row_order: Sequence[int] | None = None) -> dict[str, Any]:
    """One padding-free packed row in which each group's prompt appears once.

    A group is laid out as `prompt + c_1` (one causal block), then each further completion `c_j` as its own block
    whose position ids restart at len(prompt) and which sees the prompt as a fully visible prefix, so every
    completion token has exactly the context of its own `prompt + c_j` row. Result rows (`logit_index`,
    `target_ids`, `target_mask`, `(R, Tc)`) are the completions in group order, or `row_order[i]` at row i.
    """
    completions = [c for g in groups for c in g.completions]
    if not completions:
        raise ValueError("collate_groups needs at least one completion")
    num_rows = len(completions)
    width = max(len(c) for c in completions)  # Tc
    logit_index = torch.zeros((num_rows, width), dtype=torch.long)  # (R, Tc)
    target_ids = torch.full((num_rows, width), pad_token_id, dtype=torch.long)  # (R, Tc)
    target_mask = torch.zeros((num_rows, width), dtype=torch.bool)  # (R, Tc)
    slot = _result_rows(num_rows, row_order)

    tokens: list[int] = []
    positions: list[int] = []
    blocks: list[tuple[int, int, int, int]] = []
    built = 0
    for group in groups:
        prompt, n_prompt, start = list(group.prompt_ids), len(group.prompt_ids), len(tokens)
        if n_prompt == 0:
            # Same rule as the padded layout: nothing would predict the first completion token.
            raise PrefalignError("the prompt is empty, so no token predicts the first completion token",
                                 group.source or "batch")
        for j, completion in enumerate(group.completions):
            q_start = len(tokens)
            if j == 0:  # prompt + first completion: plain causal attention, no prefix
                tokens += prompt
                positions += range(n_prompt)
                prefix = (q_start, q_start)
            else:  # the prompt [start, start + n_prompt) is this block's fully visible prefix
                prefix = (start, start + n_prompt)
            tokens += completion
            positions += range(n_prompt, n_prompt + len(completion))
            blocks.append((q_start, len(tokens), *prefix))
            first = len(tokens) - len(completion)  # position of completion token 0
            row, n = slot[built], len(completion)
            built += 1
            if n:  # whole-row slices: this runs for every micro-batch, a per-token loop cost ~50 ms a batch
                logit_index[row, :n] = torch.arange(first - 1, first + n - 1)
                logit_index[row, 0] = start + n_prompt - 1  # the last prompt token predicts token 0
                target_ids[row, :n] = torch.tensor(list(completion), dtype=torch.long)
                target_mask[row, :n] = True

    return {
        "layout": "packed",
        "input_ids": torch.tensor([tokens], dtype=torch.long),  # (1, T)
        "position_ids": torch.tensor([positions], dtype=torch.long),  # (1, T)
        "attn_blocks": torch.tensor(blocks, dtype=torch.long),  # (N, 4)
        "logit_index": logit_index,
        "target_ids": target_ids,
        "target_mask": target_mask,
        "num_tokens": len(tokens),
    }


def packed_row_images(pairs: list[TokenizedPair], share_prompt: bool) -> list[Any]:
    """The images of a packed row in the order their tokens appear: each once with a shared prompt, else twice
    per pair (its prompt opens both of its sequences)."""
    repeat = 1 if share_prompt else 2
    return [image for p in pairs for _ in range(repeat) for image in p.images]


# ---------------------------------------------------------------- causal-LM rows (SFT --packing, pretraining)


def row_length(row: Segments) -> int:
    return sum(len(s.input_ids) for s in row)


def next_fit(lengths: Sequence[int], max_length: int | None) -> list[list[int]]:
    """Bins of consecutive positions: an item joins the current bin while the bin stays within `max_length`
    tokens, so the given (shuffled) order is kept and the same input always packs the same way."""
    bins: list[list[int]] = []
    used = 0
    for k, n in enumerate(lengths):
        if bins and (max_length is None or used + n <= max_length):
            bins[-1].append(k)
            used += n
        else:
            bins.append([k])
            used = n
    return bins


def pack_rows(rows: Sequence[Segments], max_length: int | None) -> list[Segments]:
    """Rows merged next-fit into sequences of up to `max_length` tokens."""
    return [[seg for k in b for seg in rows[k]] for b in next_fit([row_length(r) for r in rows], max_length)]
