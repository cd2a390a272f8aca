"""Causal-LM pretraining on raw text (`prefalign pretrain`), MiniMind-style from a freshly initialised model.

Documents (non-empty lines of .txt files, or a `text` column) are encoded without special tokens, each followed
by EOS, laid end to end and cut into blocks of --max_length tokens; a document longer than a block continues in
the next one. By default attention stays inside each document: inside a block every document (or the piece of
one that continues from the previous block) is its own segment with position ids from 0, and its first token
is not a target, since nothing in its context predicts it. With --per_document_attention false a block is one
plain sequence (GPT-2 style concatenation): every token attends to all before it in the block, and every token
but the block's first is a target. Loss on every other token; the step is the SFT step (train.sft.lm_loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefalign.config import DataArgs, ModelArgs, TrainArgs
from prefalign.data.sft import TokenizedSample
from prefalign.errors import PrefalignError
from prefalign.train.run import print_summary
from prefalign.train.sft import SHOWN, CausalLMStage, Row, run_lm_training


@dataclass
class PretrainArgs:
    dataset_text_field: str = "text"
    """Column holding the documents (for .jsonl/.parquet/.csv data; a .txt file has one document per line)."""
    per_document_attention: bool = True
    """Keep attention inside each document of a block (position ids restart per document); false: plain
    concatenation, every token attends to everything before it in the block."""


@dataclass
class PretrainConfig(PretrainArgs, TrainArgs, DataArgs, ModelArgs):
    """Configuration of `prefalign pretrain`."""

    learning_rate: float = 5e-4
    """Peak learning rate of AdamW (MiniMind's pretraining rate; small models from scratch want a large one)."""
    max_length: int | None = 512
    """Tokens per block."""


def pack_documents(docs: list[list[int]], block_size: int, per_document: bool) -> list[Row]:
    """Blocks of `block_size` tokens from the documents laid end to end (the last block may be shorter).

    per_document: a block is a list of segments, one per document piece, each starting untargeted;
    otherwise one segment per block whose first token is the only untargeted one.
    """
    blocks: list[Row] = []
    current: Row = []
    used = 0
    for doc in docs:
        start = 0
        while start < len(doc):
            take = min(len(doc) - start, block_size - used)
            piece = doc[start:start + take]
            current.append(TokenizedSample(piece, [False] + [True] * (len(piece) - 1)))
            used += take
            start += take
            if used == block_size:
                blocks.append(current)
                current, used = [], 0
    if current:
        blocks.append(current)
    if not per_document:
        blocks = [[TokenizedSample(ids, [False] + [True] * (len(ids) - 1))]
                  for ids in ([t for seg in block for t in seg.input_ids] for block in blocks)]
    # a block without targets (say, a trailing single token) would give a step of weight 0: leave it out
    return [b for b in blocks if any(seg.num_loss_tokens for seg in b)]


def encode_documents(texts: list[str], tokenizer: Any) -> list[list[int]]:
    """Token ids of each document with EOS appended (no other special tokens)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise PrefalignError("the tokenizer has no EOS token to separate documents", "--tokenizer_name_or_path")
    from prefalign.data.tokenize import encode_texts

    return [ids + [eos] for ids in encode_texts(tokenizer, texts)]


def _blocks(name: str, cfg: PretrainConfig, tokenizer: Any, config: str | None, split: str) -> list[Row]:
    from prefalign.data.sft import load_texts

    texts = [t for t, _ in load_texts(name, config, split, cfg.dataset_text_field)]
    return pack_documents(encode_documents(texts, tokenizer), cfg.max_length, cfg.per_document_attention)


def train_pretrain(cfg: PretrainConfig) -> Any:
    """Run pretraining end to end: documents → blocks → loop → final model in cfg.output_dir."""
    from prefalign.data.load import split_holdout

    if cfg.max_length is None:
        raise PrefalignError("pretraining needs a block size", "--max_length")

    def build(tokenizer: Any, accelerator: Any) -> CausalLMStage:
        train = _blocks(cfg.dataset_name, cfg, tokenizer, cfg.dataset_config, cfg.dataset_split)
        eval_ = None
        if cfg.eval_dataset_name:
            eval_ = _blocks(cfg.eval_dataset_name, cfg, tokenizer, cfg.eval_dataset_config, cfg.eval_dataset_split)
        elif cfg.eval_split_ratio:
            train, eval_ = split_holdout(train, cfg.eval_split_ratio, cfg.seed)
        tokens = sum(len(s.input_ids) for b in train for s in b)
        accelerator.print(f"train: {len(train)} blocks of up to {cfg.max_length} tokens ({tokens} tokens)")
        return CausalLMStage(
            train, eval_, tokenizer.pad_token_id, batch_size=cfg.per_device_train_batch_size,
            eval_batch_size=cfg.per_device_eval_batch_size, seed=cfg.seed, pack=False,
            segmented=cfg.per_document_attention, max_length=cfg.max_length,
        )

    return run_lm_training(cfg, "pretrain", build)


CONFIG = PretrainConfig


def run_command(cfg: PretrainConfig) -> None:
    """`prefalign pretrain`."""
    print_summary("pretrain", train_pretrain(cfg), cfg.output_dir, SHOWN)
