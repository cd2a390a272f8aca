"""Train a byte-level BPE tokenizer (Hugging Face `tokenizers`) with ChatML special tokens and template, saved so
that `AutoTokenizer.from_pretrained(output_dir)` loads it, template included.

Used by `prefalign train-tokenizer`, the demo, and the test fixtures (which must run offline).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from prefalign.config import TrainTokenizerConfig
from prefalign.config.checks import require
from prefalign.data.corpus import load_texts
from prefalign.data.templates import CHATML
from prefalign.errors import PrefalignError

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet and the special tokens come first

# Qwen2's pre-tokenization (GPT-4 style: words, single digits, punctuation runs, whitespace). We train with exactly
# what transformers' Qwen2Tokenizer applies, because transformers 5 loads any tokenizer saved beside a qwen2 config
# as Qwen2Tokenizer and rebuilds its normalizer and pre-tokenizer: a tokenizer trained with anything else would
# encode differently depending on which directory it is loaded from. Single digits also help arithmetic.
SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`; EOS is <|im_end|> (ends an assistant turn), pad is <|endoftext|>."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[IM_START],
        model_max_length=32768,
        padding_side="right",
    )
    fast.chat_template = CHATML
    return fast


def check_tokenizer_config(cfg: TrainTokenizerConfig) -> None:
    """Everything that can be checked before the corpus is read."""
    require(cfg, "dataset_name", "output_dir")
    if cfg.vocab_size < MIN_VOCAB:
        raise PrefalignError(f"must be at least {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), "
                             f"got {cfg.vocab_size}", "--vocab_size")
    if cfg.min_frequency < 1:
        raise PrefalignError(f"must be at least 1, got {cfg.min_frequency}", "--min_frequency")


def train_tokenizer(cfg: TrainTokenizerConfig) -> int:
    """Train and save the tokenizer; returns its vocabulary size."""
    check_tokenizer_config(cfg)
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
