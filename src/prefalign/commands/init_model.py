"""`prefalign init-model`: a randomly initialised qwen2/llama model sized by flags, with the vocabulary and
special tokens of --tokenizer, saved in Hugging Face format with that tokenizer (MiniMind-style training from
scratch starts here)."""

from __future__ import annotations

from prefalign.config import InitModelConfig
from prefalign.model.init import init_model_dir


def run_command(cfg: InitModelConfig) -> None:
    n = init_model_dir(cfg)
    print(f"init-model: {cfg.architecture} with {n / 1e6:.3f}M parameters saved to {cfg.output_dir}")
