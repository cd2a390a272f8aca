"""Configs of the causal-LM stages: supervised fine-tuning and pretraining."""

from __future__ import annotations

from dataclasses import dataclass

from prefalign.config.common import DatasetArgs, ModelArgs, PromptArgs, TrainArgs


@dataclass
class SFTArgs:
    dataset_text_field: str = "text"
    """Column holding plain text rows (trained on every token)."""
    completion_only_loss: bool = True
    """Train only on assistant turns (conversations) or the completion (prompt/completion rows); false: every token."""
    packing: bool = False
    """Pack several samples into each sequence of up to --max_length tokens, without attention between them."""
    neftune_noise_alpha: float | None = None
    """NEFTune: add uniform noise of this scale (divided by sqrt(length x hidden size)) to input embeddings in training."""
    max_length: int | None = 1024
    """Longest sample in tokens; longer samples lose their end."""


@dataclass
class SFTConfig(SFTArgs, TrainArgs, PromptArgs, DatasetArgs, ModelArgs):
    """Configuration of `prefalign sft`."""

    learning_rate: float = 2e-5
    """Peak learning rate of AdamW (TRL's SFT default)."""


@dataclass
class PretrainArgs:
    dataset_text_field: str = "text"
    """Column holding the documents (for .jsonl/.parquet/.csv data; a .txt file has one document per line)."""
    per_document_attention: bool = True
    """Keep attention inside each document of a block (position ids restart per document); false: plain
    concatenation, every token attends to everything before it in the block."""


@dataclass
class PretrainConfig(PretrainArgs, TrainArgs, DatasetArgs, ModelArgs):
    """Configuration of `prefalign pretrain`."""

    learning_rate: float = 5e-4
    """Peak learning rate of AdamW (MiniMind's pretraining rate; small models from scratch want a large one)."""
    max_length: int | None = 512
    """Tokens per block."""
