"""`prefalign train-tokenizer`: a byte-level BPE tokenizer with ChatML special tokens and template, trained on a
corpus (non-empty lines of .txt files, a `text` column, or the message contents of conversational rows) and
saved so that `AutoTokenizer.from_pretrained(output_dir)` loads it, template included."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefalign.errors import PrefalignError
from prefalign.tokenizer import SPECIAL_TOKENS

MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet and the special tokens come first


@dataclass
class TrainTokenizerConfig:
    """Configuration of `prefalign train-tokenizer`."""

    dataset_name: str | None = None
    """Corpus: a .txt file (one document per line), a directory of .txt files, a .jsonl/.json/.parquet/.csv file
    or directory, or a hub dataset id."""
    dataset_config: str | None = None
    """Configuration name of a hub dataset."""
    dataset_split: str = "train"
    """Split of --dataset_name to read."""
    dataset_text_field: str = "text"
    """Column holding the text; rows without it contribute the contents of their messages (or prompt/completion,
    chosen/rejected) columns."""
    vocab_size: int = 6400
    """Size of the vocabulary, special tokens included (MiniMind's is 6400)."""
    min_frequency: int = 2
    """A merge must occur at least this often in the corpus."""
    output_dir: str | None = None
    """Where the tokenizer is saved."""
    overwrite_output_dir: bool = False
    """Allow writing into a directory that already holds a tokenizer."""


def train_tokenizer(cfg: TrainTokenizerConfig) -> int:
    """Train and save the tokenizer; returns its vocabulary size."""
    from prefalign.data.sft import load_texts
    from prefalign.tokenizer import train_bpe_tokenizer
    from prefalign.train.run import require

    require(cfg, "dataset_name", "output_dir")
    if cfg.vocab_size < MIN_VOCAB:
        raise PrefalignError(f"must be at least {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), "
                             f"got {cfg.vocab_size}", "--vocab_size")
    if cfg.min_frequency < 1:
        raise PrefalignError(f"must be at least 1, got {cfg.min_frequency}", "--min_frequency")
    out = Path(cfg.output_dir)
    if (out / "tokenizer.json").exists() and not cfg.overwrite_output_dir:
        raise PrefalignError("already holds a tokenizer; pass --overwrite_output_dir or choose another directory",
                             f"--output_dir {out}")
    texts = [t for t, _ in load_texts(cfg.dataset_name, cfg.dataset_config, cfg.dataset_split,
                                      cfg.dataset_text_field, conversations=True)]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    return len(tokenizer)


CONFIG = TrainTokenizerConfig


def run_command(cfg: TrainTokenizerConfig) -> None:
    """`prefalign train-tokenizer`."""
    size = train_tokenizer(cfg)
    print(f"train-tokenizer: {size} tokens (eos <|im_end|>, pad <|endoftext|>, ChatML template); saved to "
          f"{cfg.output_dir}")
