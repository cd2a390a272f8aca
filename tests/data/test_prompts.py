"""Prompt-only rows for GRPO/RLOO/PPO: validation with file:line errors, extra columns, exact prompt tokens."""

from __future__ import annotations

import pytest

from helpers import conv, write_jsonl
from prefalign.config import DataArgs
from prefalign.data.prompts import load_prompts, normalize_prompt_row, tokenize_prompts
from prefalign.errors import PrefalignError


def test_rows_keep_their_other_columns_and_source(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1 + 1 =", "answer": "2"},
                                             {"prompt": conv(("user", "hello")), "answer": "hi", "id": 7}])
    train, eval_ = load_prompts(DataArgs(dataset_name=str(path)))
    assert eval_ is None
    # Arrow gives every row every column (None where absent); reward functions see the same
    assert train[0].prompt == "1 + 1 =" and train[0].columns == {"answer": "2", "id": None}
    assert not train[0].is_conversational
    assert train[1].prompt == [{"role": "user", "content": "hello"}] and train[1].columns == {"answer": "hi", "id": 7}
    assert train[0].source == f"{path}:1" and train[1].source == f"{path}:2"


@pytest.mark.parametrize("row, message", [
    ({"question": "x"}, "no 'prompt' column (columns present: question)"),
    ({"prompt": "  "}, "column 'prompt' is an empty string"),
    ({"prompt": 3}, "column 'prompt' must be a string or a list of messages, got int"),
    ({"prompt": conv(("user", "q"), ("assistant", "a"))}, "ends with an assistant message"),
])
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, row])
    with pytest.raises(PrefalignError) as e:
        load_prompts(DataArgs(dataset_name=str(path)))
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)


def test_skip_invalid_rows_keeps_the_good_ones(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": ""}, {"prompt": "b"}])
    train, _ = load_prompts(DataArgs(dataset_name=str(path), skip_invalid_rows=True))
    assert [e.prompt for e in train] == ["a", "b"]


def test_template_system_prompt_and_exact_tokens(tiny_tokenizer):
    """ChatML with the generation prompt, as the tokenizer encodes that very text; strings get prompt_template."""
    args = DataArgs(system_prompt="be brief", prompt_template="Q: {prompt}\nA:")
    chat = normalize_prompt_row({"prompt": conv(("user", "what is two plus two"))}, "f:1", args)
    text = normalize_prompt_row({"prompt": "two plus two"}, "f:2", args)
    assert text.prompt == "Q: two plus two\nA:"
    ids, cut = tokenize_prompts([chat, text], tiny_tokenizer)
    expected_chat = ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhat is two plus two<|im_end|>\n"
                     "<|im_start|>assistant\n")
    assert tiny_tokenizer.decode(ids[0]) == expected_chat
    assert ids[0] == tiny_tokenizer(expected_chat, add_special_tokens=False)["input_ids"]
    assert ids[1] == tiny_tokenizer("Q: two plus two\nA:", add_special_tokens=False)["input_ids"]
    assert cut == 0


def test_truncation_keeps_the_end_or_the_start(tiny_tokenizer):
    ex = normalize_prompt_row({"prompt": "one two three four five"}, "f:1", DataArgs())
    full = tiny_tokenizer("one two three four five", add_special_tokens=False)["input_ids"]
    assert len(full) > 3
    assert tokenize_prompts([ex], tiny_tokenizer, 3, "keep_end") == ([full[-3:]], 1)
    assert tokenize_prompts([ex], tiny_tokenizer, 3, "keep_start") == ([full[:3]], 1)
    with pytest.raises(PrefalignError, match="--truncation_mode"):
        tokenize_prompts([ex], tiny_tokenizer, 3, "middle")
