"""SFT rows → token ids and loss masks, with exact tokens of the tiny ChatML tokenizer."""

from __future__ import annotations

import pytest

from helpers import conv, write_jsonl
from prefalign.config import SFTConfig
from prefalign.data.corpus import load_texts
from prefalign.data.sft import load_sft_examples, normalize_sft_row, tokenize_sft
from prefalign.data.types import SFTExample
from prefalign.errors import PrefalignError


def cfg(**kw) -> SFTConfig:
    return SFTConfig(**kw)


def trained(tok, sample) -> str:
    """The decoded target tokens, turns separated by '|' where the mask has a gap."""
    out, prev = [], False
    for tid, m in zip(sample.input_ids, sample.loss_mask):
        if m:
            out.append(("|" if out and not prev else "") + tok.decode([tid]))
        prev = m
    return "".join(out)


def test_every_assistant_turn_is_trained_and_nothing_else(tiny_tokenizer):
    """Turn i's tokens are what template(messages[:i+1]) adds after template(messages[:i], gen prompt): with
    ChatML that is the answer, <|im_end|> and '\\n'; user turns and assistant headers are context."""
    ex = SFTExample("f:1", messages=conv(("system", "be good"), ("user", "hello"), ("assistant", "hi"),
                                         ("user", "two plus two"), ("assistant", "four")))
    [s], stats = tokenize_sft([ex], tiny_tokenizer, cfg())
    text = tiny_tokenizer.apply_chat_template(ex.messages, tokenize=False)
    assert s.input_ids == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert trained(tiny_tokenizer, s) == "hi<|im_end|>\n|four<|im_end|>\n"
    assert s.num_loss_tokens == len(tiny_tokenizer("hi<|im_end|>\nfour<|im_end|>\n")["input_ids"])
    assert stats.kept == 1 and stats.prefix_mismatch == 0


def test_completion_only_loss_false_trains_every_token_but_the_first(tiny_tokenizer):
    ex = SFTExample("f:1", messages=conv(("user", "hello"), ("assistant", "hi")))
    [s], _ = tokenize_sft([ex], tiny_tokenizer, cfg(completion_only_loss=False))
    assert s.loss_mask == [False] + [True] * (len(s.input_ids) - 1)


def test_prompt_completion_conversation_trains_the_completion_only(tiny_tokenizer):
    """An assistant turn inside the prompt is context (TRL's completion_only_loss)."""
    row = {"prompt": conv(("user", "hello"), ("assistant", "hi"), ("user", "and you")),
           "completion": conv(("assistant", "good"))}
    ex = normalize_sft_row(row, "f:1", cfg())
    [s], _ = tokenize_sft([ex], tiny_tokenizer, cfg())
    assert trained(tiny_tokenizer, s) == "good<|im_end|>\n"


def test_raw_prompt_completion_and_text_get_eos(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    pc = normalize_sft_row({"prompt": "the cat", "completion": " is blue"}, "f:1", cfg())
    txt = normalize_sft_row({"text": "the sky"}, "f:2", cfg())
    [a, b], _ = tokenize_sft([pc, txt], tiny_tokenizer, cfg())
    prompt = tiny_tokenizer("the cat", add_special_tokens=False)["input_ids"]
    answer = tiny_tokenizer(" is blue", add_special_tokens=False)["input_ids"]
    assert a.input_ids == prompt + answer + [eos]
    assert a.loss_mask == [False] * len(prompt) + [True] * (len(answer) + 1)
    sky = tiny_tokenizer("the sky", add_special_tokens=False)["input_ids"]
    assert b.input_ids == sky + [eos] and b.loss_mask == [False] + [True] * len(sky)


def test_truncation_cuts_the_end_and_drops_samples_left_without_targets(tiny_tokenizer):
    long = SFTExample("f:1", messages=conv(("user", "hello"), ("assistant", "the cat is blue")))
    prompt = tiny_tokenizer.apply_chat_template(conv(("user", "hello")), tokenize=False, add_generation_prompt=True)
    prompt_len = len(tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    [s], stats = tokenize_sft([long], tiny_tokenizer, cfg(max_length=prompt_len + 2))
    assert len(s.input_ids) == prompt_len + 2 and s.num_loss_tokens == 2 and stats.truncated == 1
    with pytest.raises(PrefalignError, match="all 1 samples dropped"):
        tokenize_sft([long], tiny_tokenizer, cfg(max_length=prompt_len))


def test_ultrachat_rows_and_errors_name_the_line(tmp_path):
    good = {"prompt": "hi", "prompt_id": "abc", "messages": conv(("user", "hi"), ("assistant", "hello"))}
    path = write_jsonl(tmp_path / "d.jsonl", [good, {"messages": conv(("user", "hi"), ("robot", "x"))}])
    with pytest.raises(PrefalignError) as e:
        load_sft_examples(cfg(dataset_name=str(path)))
    assert str(e.value) == f"{path}:2: 'messages' message 1 has role 'robot' (allowed: system, user, assistant, tool)"
    train, _ = load_sft_examples(cfg(dataset_name=str(path), skip_invalid_rows=True))
    assert [ex.source for ex in train] == [f"{path}:1"] and train[0].messages == good["messages"]
    with pytest.raises(PrefalignError, match="no 'messages', 'prompt'\\+'completion' or 'text' column"):
        normalize_sft_row({"question": "x"}, "f:3", cfg())


def test_system_prompt_is_added_to_conversations_without_one():
    ex = normalize_sft_row({"messages": conv(("user", "q"), ("assistant", "a"))}, "f:1", cfg(system_prompt="S"))
    assert ex.messages[0] == {"role": "system", "content": "S"}


def test_load_texts_reads_txt_lines_and_text_columns(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("first doc\n\nsecond doc\n")
    assert load_texts(str(txt)) == [("first doc", f"{txt}:1"), ("second doc", f"{txt}:3")]
    rows = write_jsonl(tmp_path / "c.jsonl", [{"text": "a b"}, {"messages": conv(("user", "q"), ("assistant", "r"))}])
    assert [t for t, _ in load_texts(str(rows), conversations=True)] == ["a b", "q", "r"]
    with pytest.raises(PrefalignError, match=f"{rows}:2: no 'text' column"):
        load_texts(str(rows))
