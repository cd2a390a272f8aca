"""`prefalign train-tokenizer`: a byte-level BPE tokenizer with ChatML special tokens and template, trained on a
corpus (non-empty lines of .txt files, a `text` column, or the message contents of conversational rows)."""

from __future__ import annotations

from prefalign.config import TrainTokenizerConfig
from prefalign.data.tokenizer import train_tokenizer


def run_command(cfg: TrainTokenizerConfig) -> None:
    size = train_tokenizer(cfg)
    print(f"train-tokenizer: {size} tokens (eos <|im_end|>, pad <|endoftext|>, ChatML template); saved to "
          f"{cfg.output_dir}")
