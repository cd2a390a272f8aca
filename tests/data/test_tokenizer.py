"""The trained tokenizer encodes the same whichever way transformers loads it.

transformers 5 loads a tokenizer saved beside a qwen2 config as Qwen2Tokenizer and rebuilds its pre-tokenizer;
beside a llama config (or alone) it stays a generic TokenizersBackend. Both must give the same ids, or a model would
be trained on ids its own directory does not reproduce."""

from __future__ import annotations

import unicodedata

import pytest
from transformers import AutoTokenizer

from helpers import build_model, corpus
from prefalign.data.tokenizer import train_bpe_tokenizer

TEXTS = ["what is 3 + 45", " 3", "37 + 48 = 85", "Hello, world!  It's 2026.\n\nNew line", "naïve café ",
         "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]


@pytest.mark.parametrize("architecture", ["qwen2", "llama"])
def test_same_ids_from_tokenizer_dir_and_model_dir(tmp_path, architecture):
    tok = train_bpe_tokenizer(corpus(), vocab_size=300)
    tok.save_pretrained(tmp_path / "tok")
    build_model(tmp_path / "model", tok, architecture)
    a = AutoTokenizer.from_pretrained(tmp_path / "tok")
    b = AutoTokenizer.from_pretrained(tmp_path / "model")
    for text in TEXTS:
        assert a(text).input_ids == b(text).input_ids == tok(text).input_ids, (type(b).__name__, text)
        assert a.decode(a(text).input_ids) == text  # every text here is already NFC
    # NFD input ("i" + combining diaeresis, "e" + combining acute) is normalised to NFC: the same ids as the
    # precomposed text, and it decodes to the precomposed characters
    decomposed, composed = "nai\u0308ve cafe\u0301", "na\u00efve caf\u00e9"
    assert unicodedata.normalize("NFC", decomposed) == composed and decomposed != composed
    assert a(decomposed).input_ids == a(composed).input_ids == b(decomposed).input_ids
    assert a.decode(a(decomposed).input_ids) == composed
    assert (a.eos_token, a.pad_token) == (b.eos_token, b.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert a.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        b.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_digits_are_single_tokens():
    tok = train_bpe_tokenizer(corpus(), vocab_size=400)
    pieces = tok.convert_ids_to_tokens(tok("12345 + 678").input_ids)
    assert all(len(p.strip("Ġ")) <= 1 for p in pieces if any(c.isdigit() for c in p))
