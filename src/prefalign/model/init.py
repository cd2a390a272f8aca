"""Build a randomly initialised causal LM from a config (MiniMind-style training from scratch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from prefalign.errors import PrefalignError

ARCHITECTURES = {"qwen2": Qwen2Config, "llama": LlamaConfig}


@dataclass
class ModelShape:
    """Size of a model built from scratch."""

    architecture: str = "qwen2"
    """Model family: qwen2 or llama."""
    hidden_size: int = 64
    """Width of the residual stream."""
    num_hidden_layers: int = 2
    """Number of transformer blocks."""
    num_attention_heads: int = 4
    """Query heads per layer."""
    num_key_value_heads: int | None = None
    """Key/value heads (grouped-query attention); default: same as num_attention_heads."""
    intermediate_size: int | None = None
    """MLP width; default: 8/3 x hidden_size (SwiGLU), rounded to a multiple of 32."""
    max_position_embeddings: int = 2048
    """Longest sequence the rotary embedding is set up for."""
    tie_word_embeddings: bool = True
    """Share input embeddings and LM head (saves parameters in small models)."""


def init_model(shape: ModelShape, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    """A freshly initialised model whose vocabulary and special-token ids match `tokenizer`."""
    if shape.architecture not in ARCHITECTURES:
        raise PrefalignError(f"unknown architecture {shape.architecture!r}; choose one of {sorted(ARCHITECTURES)}", "--architecture")
    if shape.hidden_size % shape.num_attention_heads:
        raise PrefalignError(
            f"hidden_size {shape.hidden_size} is not divisible by num_attention_heads {shape.num_attention_heads}",
            "--hidden_size",
        )
    intermediate = shape.intermediate_size or 32 * round(shape.hidden_size * 8 / 3 / 32) or shape.hidden_size * 2
    config = ARCHITECTURES[shape.architecture](
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads or shape.num_attention_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=shape.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)
