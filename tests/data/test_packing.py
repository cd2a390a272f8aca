"""Packing of preference pairs into padding-free rows: exact tokens, positions, blocks and scored positions.

Every expected value below is written out by hand from the pair definitions (ids chosen so that prompt,
chosen and rejected tokens are recognisable: prompts 1x, chosen 2x, rejected 3x).
"""

from __future__ import annotations

import pytest
import torch

from prefalign.data.packing import collate_packed, pack_pairs, pair_cost
from prefalign.data.types import TokenizedPair
from prefalign.errors import PrefalignError

PAD = 0
A = TokenizedPair(prompt_ids=[11, 12, 13], chosen_ids=[21, 22], rejected_ids=[31, 32, 33], source="a.jsonl:1")
B = TokenizedPair(prompt_ids=[14, 15], chosen_ids=[23, 24, 25], rejected_ids=[34], source="a.jsonl:2")


def test_shared_prompt_row_tokens_positions_and_blocks():
    batch = collate_packed([A, B], PAD, share_prompt=True)
    assert batch["layout"] == "packed" and batch["num_pairs"] == 2 and batch["share_prompt"] is True
    # A: prompt, chosen, rejected (8 tokens); B: prompt, chosen, rejected (6 tokens). No pad anywhere.
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31, 32, 33, 14, 15, 23, 24, 25, 34]]
    # Rejected positions restart right after the prompt: A's at 3, B's at 2.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 2, 3, 4, 2]]
    # (q_start, q_end, prefix_start, prefix_end): prompt+chosen causal; rejected sees its prompt as a prefix.
    assert batch["attn_blocks"].tolist() == [[0, 5, 0, 0], [5, 8, 0, 3], [8, 13, 8, 8], [13, 14, 8, 10]]
    assert batch["num_tokens"] == 14


def test_shared_prompt_scoring_positions():
    batch = collate_packed([A, B], PAD, share_prompt=True)
    # Rows: chosen A, chosen B, rejected A, rejected B; Tc = 3 (longest completion).
    assert batch["target_ids"].tolist() == [[21, 22, PAD], [23, 24, 25], [31, 32, 33], [34, PAD, PAD]]
    assert batch["target_mask"].tolist() == [
        [True, True, False], [True, True, True], [True, True, True], [True, False, False]
    ]
    # Chosen A token 21 is predicted by the last prompt token (position 2), 22 by 21 (position 3).
    # Rejected A token 31 is predicted by the same last prompt token (2), 32 by 31 (5), 33 by 32 (6).
    # B starts at 8: its last prompt token is at 9; chosen at 10..12; rejected 34 is predicted by 9.
    index = batch["logit_index"]
    mask = batch["target_mask"]
    assert index[mask].tolist() == [2, 3, 9, 10, 11, 2, 5, 6, 9]


def test_separate_documents_without_prompt_sharing():
    batch = collate_packed([A, B], PAD, share_prompt=False)
    assert batch["input_ids"].tolist() == [
        [11, 12, 13, 21, 22, 11, 12, 13, 31, 32, 33, 14, 15, 23, 24, 25, 14, 15, 34]
    ]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 0, 1, 2]]
    assert batch["attn_blocks"].tolist() == [[0, 5, 0, 0], [5, 11, 5, 5], [11, 16, 11, 11], [16, 19, 16, 16]]
    # Rejected A's first token is predicted by its own copy of the prompt (position 7), not chosen's.
    assert batch["logit_index"][batch["target_mask"]].tolist() == [2, 3, 12, 13, 14, 7, 8, 9, 17]


def test_pair_cost_counts_prompt_once_when_shared():
    assert pair_cost(A, share_prompt=True) == 3 + 2 + 3
    assert pair_cost(A, share_prompt=False) == 2 * 3 + 2 + 3


def test_pack_pairs_is_next_fit_in_order():
    pairs = [A, B, A, B, A]  # shared costs 8, 6, 8, 6, 8
    assert pack_pairs(pairs, max_tokens_per_batch=14, share_prompt=True) == [[0, 1], [2, 3], [4]]
    assert pack_pairs(pairs, max_tokens_per_batch=16, share_prompt=True) == [[0, 1], [2, 3], [4]]
    assert pack_pairs(pairs, max_tokens_per_batch=22, share_prompt=True) == [[0, 1, 2], [3, 4]]
    # Unshared costs 11, 8, 11, 8, 11: a budget of 19 holds one A and one B.
    assert pack_pairs(pairs, max_tokens_per_batch=19, share_prompt=False) == [[0, 1], [2, 3], [4]]


def test_pair_longer_than_budget_is_kept_whole_and_alone():
    assert pack_pairs([B, A, B], max_tokens_per_batch=7, share_prompt=True) == [[0], [1], [2]]
    assert pack_pairs([], max_tokens_per_batch=7, share_prompt=True) == []
    with pytest.raises(ValueError):
        pack_pairs([A], max_tokens_per_batch=0, share_prompt=True)


def test_every_token_of_a_packed_batch_is_used_once():
    pairs = [A, B, A]
    for share in (True, False):
        batch = collate_packed(pairs, PAD, share_prompt=share)
        assert batch["num_tokens"] == sum(pair_cost(p, share) for p in pairs)
        blocks = batch["attn_blocks"]
        # Blocks tile the row in order: each starts where the previous one ended.
        assert blocks[0, 0] == 0 and blocks[-1, 1] == batch["num_tokens"]
        assert torch.equal(blocks[1:, 0], blocks[:-1, 1])


def test_empty_prompt_is_a_user_error_naming_the_row():
    bad = TokenizedPair(prompt_ids=[], chosen_ids=[21], rejected_ids=[31], source="data.jsonl:7")
    with pytest.raises(PrefalignError, match="data.jsonl:7"):
        collate_packed([A, bad], PAD, share_prompt=True)
