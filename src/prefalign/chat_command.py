"""`prefalign chat`: talk to a model in the terminal, replies streamed token by token (`prefalign.chat`).

A directory with adapter_config.json is a LoRA adapter: its base model (adapter_config's
base_model_name_or_path, or --base_model_name_or_path) is loaded and the adapter applied with peft.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefalign.errors import PrefalignError


@dataclass
class ChatConfig:
    """Configuration of `prefalign chat`."""

    model_name_or_path: str | None = None
    """Model directory, or a LoRA adapter directory (one with adapter_config.json)."""
    base_model_name_or_path: str | None = None
    """Base model of a LoRA adapter (default: the base recorded in adapter_config.json)."""
    tokenizer_name_or_path: str | None = None
    """Tokenizer to use (default: the model's or adapter's own, else the base model's)."""
    prompt: str | None = None
    """Answer this one message and exit instead of starting an interactive chat."""
    system_prompt: str | None = None
    """System message at the start of the conversation."""
    temperature: float = 0.7
    """Sampling temperature; 0 decodes greedily."""
    top_p: float = 0.9
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    max_new_tokens: int = 256
    """Most tokens generated per reply."""
    seed: int | None = None
    """Seed the sampler, so that the same conversation gives the same replies."""


def _adapter_base(path: Path, base: str | None) -> str:
    if base:
        return base
    recorded = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not recorded:
        raise PrefalignError("the adapter names no base model; pass --base_model_name_or_path", str(path))
    return recorded


def load_model_for_inference(path: str, base_model: str | None = None, tokenizer_path: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode: a full model, or a base model with the LoRA adapter at `path` applied."""
    from peft import PeftModel

    from prefalign.config import ModelArgs
    from prefalign.model.load import load_pretrained, load_tokenizer

    if not path:
        raise PrefalignError("is required", "--model_name_or_path")
    p = Path(path).expanduser()
    is_adapter = (p / "adapter_config.json").is_file()
    if is_adapter:
        base = _adapter_base(p, base_model)
        model = load_pretrained(base, ModelArgs(), "--base_model_name_or_path")
        try:
            model = PeftModel.from_pretrained(model, str(p))
        except (OSError, ValueError, KeyError) as e:
            raise PrefalignError(f"cannot load a LoRA adapter: {str(e).splitlines()[0]}", f"--model_name_or_path {path}") from None
    else:
        model = load_pretrained(path, ModelArgs(), "--model_name_or_path")
    # the adapter directory usually holds the tokenizer too; fall back to the base model's
    tok_source = tokenizer_path or (path if (p / "tokenizer_config.json").is_file() or not is_adapter else base)
    tokenizer = load_tokenizer(ModelArgs(model_name_or_path=tok_source))
    return model.eval(), tokenizer


def _check(cfg: ChatConfig) -> None:
    if cfg.temperature < 0:
        raise PrefalignError(f"must be >= 0, got {cfg.temperature}", "--temperature")
    if not 0 < cfg.top_p <= 1:
        raise PrefalignError(f"must be in (0, 1], got {cfg.top_p}", "--top_p")
    if cfg.max_new_tokens < 1:
        raise PrefalignError(f"must be at least 1, got {cfg.max_new_tokens}", "--max_new_tokens")


def run_chat(cfg: ChatConfig, input_fn: Any = input, output: Any = None) -> list[dict[str, str]]:
    """One answer (--prompt) or an interactive session; returns the conversation."""
    import torch

    from prefalign.chat import chat_loop, generate_reply

    _check(cfg)
    model, tokenizer = load_model_for_inference(cfg.model_name_or_path, cfg.base_model_name_or_path,
                                                cfg.tokenizer_name_or_path)
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    out = output if output is not None else sys.stdout
    sampling = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p}
    if cfg.prompt is not None:
        messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else [])
        messages.append({"role": "user", "content": cfg.prompt})
        reply = generate_reply(model, tokenizer, messages, stream=out, **sampling)
        out.write("\n")
        return [*messages, {"role": "assistant", "content": reply}]
    return chat_loop(model, tokenizer, input_fn=input_fn, output=out, system_prompt=cfg.system_prompt, **sampling)


CONFIG = ChatConfig


def run_command(cfg: ChatConfig) -> None:
    """`prefalign chat`."""
    run_chat(cfg)
