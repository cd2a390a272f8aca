"""`prefalign init-model`: a randomly initialised qwen2/llama model sized by flags, with the vocabulary and
special tokens of --tokenizer, saved in Hugging Face format with that tokenizer (MiniMind-style training from
scratch starts here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefalign.errors import PrefalignError
from prefalign.model.init import ModelShape


@dataclass
class InitModelConfig(ModelShape):
    """Configuration of `prefalign init-model`."""

    tokenizer: str | None = None
    """Tokenizer directory (e.g. from `prefalign train-tokenizer`): sets the vocabulary size and special tokens."""
    output_dir: str | None = None
    """Where the model and its tokenizer are saved."""
    overwrite_output_dir: bool = False
    """Allow replacing a model already in --output_dir."""
    seed: int = 42
    """Seed of the random initialisation."""


def _count(model: object) -> int:
    return sum(p.numel() for p in model.parameters())  # type: ignore[attr-defined]


def init_model_command(cfg: InitModelConfig) -> int:
    """Build, save and return the parameter count of the model."""
    from transformers import AutoTokenizer

    from prefalign.model.init import init_model

    if not cfg.tokenizer:
        raise PrefalignError("is required", "--tokenizer")
    if not cfg.output_dir:
        raise PrefalignError("is required", "--output_dir")
    for flag in ("hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
        if getattr(cfg, flag) < 1:
            raise PrefalignError(f"must be at least 1, got {getattr(cfg, flag)}", f"--{flag}")
    if cfg.num_key_value_heads and cfg.num_attention_heads % cfg.num_key_value_heads:
        raise PrefalignError(f"num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {cfg.num_key_value_heads}", "--num_key_value_heads")
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
    shape = ModelShape(**{k: getattr(cfg, k) for k in ModelShape.__dataclass_fields__})
    model = init_model(shape, tokenizer, seed=cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return _count(model)


CONFIG = InitModelConfig


def run_command(cfg: InitModelConfig) -> None:
    """`prefalign init-model`."""
    n = init_model_command(cfg)
    print(f"init-model: {cfg.architecture} with {n / 1e6:.3f}M parameters saved to {cfg.output_dir}")
