"""Tiny offline models and tokenizers for tests: built on the spot, in seconds, no download."""

from __future__ import annotations

import json
import random
from pathlib import Path

from prefalign.config.tools import ModelShape
from prefalign.data.tokenizer import train_bpe_tokenizer
from prefalign.model.init import init_model

WORDS = " ".join([
    "the a an what is how why who when where which answer question user assistant system hello world",
    "good bad yes no please thank you sure here it capital of france paris number two three four five",
    "plus minus equals sum one zero cat dog sky blue red green i am can will do not help me with this",
]).split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]
    lines += [f"{a} + {b} = {a + b}" for a in range(20) for b in range(0, 20, 3)]
    lines += ["<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n"] * 5
    return lines


def build_tokenizer(out_dir: Path, vocab_size: int = 400):
    tok = train_bpe_tokenizer(corpus(), vocab_size=vocab_size)
    tok.save_pretrained(out_dir)
    return tok


def build_model(out_dir: Path, tokenizer, architecture: str = "qwen2", hidden_size: int = 32, seed: int = 0):
    shape = ModelShape(architecture=architecture, hidden_size=hidden_size, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = init_model(shape, tokenizer, seed=seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def conv(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in turns]


def run_cli(command: str, model_dir, data, out, *extra) -> int:
    """`prefalign COMMAND` in-process on a tiny model: quiet, every step logged, no trackers; `extra` flags win."""
    from prefalign.cli import main

    return main([command, "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out),
                 "--logging_steps", "1", "--disable_tqdm", "--report_to", "none", *map(str, extra)])
