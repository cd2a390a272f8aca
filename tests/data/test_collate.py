"""collate_padded: exact rows, masks and padding, written out by hand."""

from __future__ import annotations

import pytest
import torch

from prefalign.data.collate import collate_padded
from prefalign.data.types import TokenizedPair

PAD = 0


def test_two_pairs_exact_layout() -> None:
    # Pair 1: prompt [5, 6], chosen [7], rejected [8, 9, 10]   -> rows of length 3 and 5
    # Pair 2: prompt [11], chosen [12, 13], rejected [14]       -> rows of length 3 and 2
    # Longest row is 5, so every row is right-padded to 5 with PAD.
    pairs = [
        TokenizedPair(prompt_ids=[5, 6], chosen_ids=[7], rejected_ids=[8, 9, 10]),
        TokenizedPair(prompt_ids=[11], chosen_ids=[12, 13], rejected_ids=[14]),
    ]
    batch = collate_padded(pairs, pad_token_id=PAD)

    assert batch["layout"] == "padded"
    assert batch["num_pairs"] == 2
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, PAD, PAD],  # pair 1 chosen
        [11, 12, 13, PAD, PAD],  # pair 2 chosen
        [5, 6, 8, 9, 10],  # pair 1 rejected
        [11, 14, PAD, PAD, PAD],  # pair 2 rejected
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
    ]
    assert batch["completion_mask"].tolist() == [
        [0, 0, 1, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1],
        [0, 1, 0, 0, 0],
    ]
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert batch[key].dtype == torch.long


def test_pad_token_equal_to_a_real_token_is_still_masked() -> None:
    # The pad id 7 also occurs as a real completion token: the masks, not the ids, say which is which.
    batch = collate_padded([TokenizedPair([1], [7, 7], [2])], pad_token_id=7)
    assert batch["input_ids"].tolist() == [[1, 7, 7], [1, 2, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["completion_mask"].tolist() == [[0, 1, 1], [0, 1, 0]]


def test_real_tokenizer_ids(tiny_tokenizer) -> None:
    prompt = tiny_tokenizer("what is two plus two", add_special_tokens=False)["input_ids"]
    chosen = tiny_tokenizer(" four", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    rejected = tiny_tokenizer(" five", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    pad = tiny_tokenizer.pad_token_id
    batch = collate_padded([TokenizedPair(prompt, chosen, rejected)], pad_token_id=pad)
    width = len(prompt) + max(len(chosen), len(rejected))
    assert batch["input_ids"].tolist() == [
        prompt + chosen + [pad] * (width - len(prompt) - len(chosen)),
        prompt + rejected + [pad] * (width - len(prompt) - len(rejected)),
    ]
    # The completion decodes back to exactly what was tokenized (mask picks the right positions).
    row = batch["input_ids"][0][batch["completion_mask"][0].bool()].tolist()
    assert tiny_tokenizer.decode(row) == " four<|im_end|>"


def test_empty_batch_rejected() -> None:
    with pytest.raises(ValueError):
        collate_padded([], pad_token_id=0)
