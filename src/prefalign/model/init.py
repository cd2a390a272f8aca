"""Build a randomly initialised causal LM from a config (MiniMind-style training from scratch): `init_model` in memory,
`init_model_dir` checked and saved in Hugging Face format with its tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from prefalign.config.tools import InitModelConfig, ModelShape
from prefalign.errors import PrefalignError

ARCHITECTURES = {"qwen2": Qwen2Config, "llama": LlamaConfig}


def check_shape(shape: ModelShape) -> None:
    """Refuse a shape transformers would reject later, naming the flag."""
    for flag in ("hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
        if getattr(shape, flag) < 1:
            raise PrefalignError(f"must be at least 1, got {getattr(shape, flag)}", f"--{flag}")
    if shape.num_key_value_heads and shape.num_attention_heads % shape.num_key_value_heads:
        raise PrefalignError(f"num_attention_heads {shape.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {shape.num_key_value_heads}", "--num_key_value_heads")
    if shape.architecture not in ARCHITECTURES:
        raise PrefalignError(f"unknown architecture {shape.architecture!r}; choose one of {sorted(ARCHITECTURES)}", "--architecture")
    if shape.hidden_size % shape.num_attention_heads:
        raise PrefalignError(
            f"hidden_size {shape.hidden_size} is not divisible by num_attention_heads {shape.num_attention_heads}",
            "--hidden_size",
        )


def init_model(shape: ModelShape, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    """A freshly initialised model whose vocabulary and special-token ids match `tokenizer`."""
    check_shape(shape)
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


def check_init_config(cfg: InitModelConfig) -> ModelShape:
    """Everything that can be checked before the tokenizer is read; returns the shape."""
    if not cfg.tokenizer:
        raise PrefalignError("is required", "--tokenizer")
    if not cfg.output_dir:
        raise PrefalignError("is required", "--output_dir")
    shape = ModelShape(**{k: getattr(cfg, k) for k in ModelShape.__dataclass_fields__})
    check_shape(shape)
    return shape


def init_model_dir(cfg: InitModelConfig) -> int:
    """Build, save and return the parameter count of the model."""
    shape = check_init_config(cfg)
    out = Path(cfg.output_dir)
    if (out / "config.json").exists() and not cfg.overwrite_output_dir:
        raise PrefalignError("already holds a model; pass --overwrite_output_dir or choose another directory",
                             f"--output_dir {out}")
    if not Path(cfg.tokenizer).expanduser().is_dir():
        raise PrefalignError("no such tokenizer directory", f"--tokenizer {cfg.tokenizer}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    except (OSError, ValueError) as e:
        raise PrefalignError(f"cannot load a tokenizer: {str(e).splitlines()[0]}", f"--tokenizer {cfg.tokenizer}") from None
    model = init_model(shape, tokenizer, seed=cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())
