"""`prefalign train-tokenizer`: corpus formats, the saved tokenizer loads with its ChatML template."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from helpers import conv, corpus, write_jsonl
from prefalign.config import TrainTokenizerConfig
from prefalign.data.tokenizer import train_tokenizer
from prefalign.errors import PrefalignError


def test_trains_from_conversations_and_loads_with_template(tmp_path):
    rows = [{"messages": conv(("user", line), ("assistant", line[::-1]))} for line in corpus(100)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "tok"
    assert train_tokenizer(TrainTokenizerConfig(dataset_name=str(data), vocab_size=300, output_dir=str(out))) == 300
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template(conv(("user", "hi")), tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and tok.decode(ids) == text  # byte-level round trip
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_refuses_to_overwrite_and_checks_vocab(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("\n".join(corpus(50)))
    out = tmp_path / "tok"
    train_tokenizer(TrainTokenizerConfig(dataset_name=str(txt), vocab_size=270, output_dir=str(out)))
    with pytest.raises(PrefalignError, match="already holds a tokenizer"):
        train_tokenizer(TrainTokenizerConfig(dataset_name=str(txt), vocab_size=270, output_dir=str(out)))
    train_tokenizer(TrainTokenizerConfig(dataset_name=str(txt), vocab_size=280, output_dir=str(out),
                                         overwrite_output_dir=True))
    assert len(AutoTokenizer.from_pretrained(out)) == 280
    with pytest.raises(PrefalignError, match="--vocab_size: must be at least 259"):
        train_tokenizer(TrainTokenizerConfig(dataset_name=str(txt), vocab_size=10, output_dir=str(out)))
