"""`prefalign chat`: talk to a model in the terminal, replies streamed token by token (`rollout.answers.generate_reply`).

A directory with adapter_config.json is a LoRA adapter: its base model (adapter_config's
base_model_name_or_path, or --base_model_name_or_path) is loaded and the adapter applied with peft
(`model.load.load_model_for_inference`). `chat_loop` is the interactive session, usable with any loaded model:
lines starting with / are commands (/help lists them), never sent to the model, and Ctrl-C while a reply streams
stops that reply, not the session.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prefalign.config import ChatConfig
from prefalign.data.images import parse_image
from prefalign.data.templates import render, resolve_chat_template
from prefalign.data.types import Message
from prefalign.errors import PrefalignError
from prefalign.model.load import load_for_inference
from prefalign.rollout.answers import generate_reply


def _check(cfg: ChatConfig) -> None:
    if cfg.temperature < 0:
        raise PrefalignError(f"must be >= 0, got {cfg.temperature}", "--temperature")
    if not 0 < cfg.top_p <= 1:
        raise PrefalignError(f"must be in (0, 1], got {cfg.top_p}", "--top_p")
    if cfg.max_new_tokens < 1:
        raise PrefalignError(f"must be at least 1, got {cfg.max_new_tokens}", "--max_new_tokens")


COMMANDS = {"/help": "list these commands", "/reset": "clear the conversation (the system prompt stays)",
            "/image PATH": "attach an image to your next message (vision-language models)",
            "/exit": "quit (as does end of input, Ctrl-D)"}
HELP = ("Commands: " + ", ".join(f"{name} {what}" for name, what in COMMANDS.items())
        + ". Ctrl-C stops a reply while it streams.")


def check_system_prompt(tokenizer: PreTrainedTokenizerBase, system_prompt: str | None) -> None:
    """A template that cannot render a system message (one that raises on the role) is refused before the chat
    starts, in one line, as training refuses it."""
    if system_prompt is None:
        return
    try:
        render(tokenizer, [{"role": "system", "content": system_prompt}, {"role": "user", "content": "hello"}], True)
    except PrefalignError as e:
        raise PrefalignError(f"the chat template cannot render a system message ({e.reason}); drop --system_prompt "
                             "or choose another --chat_template", "--system_prompt") from None


def _command(text: str, out: TextIO) -> str | None:
    """What a /command line asks for ("exit", "reset", "image", "help"), answering /help and unknown commands
    itself."""
    if text in ("/exit", "/reset"):
        return text[1:]
    if text.split()[0] == "/image":
        return "image"
    if text == "/help":
        out.write(HELP + "\n")
    else:
        out.write(f"unknown command {text.split()[0]}; {HELP}\n")
    return "help"


def chat_loop(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    input_fn: Callable[[str], str] = input,
    output: TextIO | None = None,
    system_prompt: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    prompt: str = ">>> ",
    processor: Any = None,
) -> list[Message]:
    """Read user turns from `input_fn` until /exit or EOF, streaming each reply to `output`; returns the history.

    The history keeps every turn since the last /reset, so each reply sees the whole conversation. `/image PATH`
    puts an image part before the next message's text (needs a vision-language model's `processor`).
    """
    out = output if output is not None else sys.stdout
    start: list[Message] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    history: list[Message] = list(start)
    attached: list[dict[str, Any]] = []  # image parts for the next user message
    out.write(HELP + "\n")
    while True:
        try:
            line = input_fn(prompt)
        except EOFError:
            out.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        action = _command(text, out) if text.startswith("/") else None
        if action == "exit":
            break
        if action == "reset":
            history, attached = list(start), []
            out.write("(conversation cleared)\n")
        if action == "image":
            attached += _attach(text.removeprefix("/image").strip(), processor, out)
        if action is not None:
            continue
        content: Any = [*attached, {"type": "text", "text": text}] if attached else text
        turn = [*history, {"role": "user", "content": content}]
        try:
            reply = generate_reply(model, tokenizer, turn, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, stream=out, processor=processor)
        except KeyboardInterrupt:  # Ctrl-C stops this reply; the turn is not kept, the session goes on
            out.write("\n(reply stopped; this turn is not kept)\n")
            continue
        attached = []
        out.write("\n")
        history = [*turn, {"role": "assistant", "content": reply}]
    return history


def _attach(path: str, processor: Any, out: TextIO) -> list[dict[str, Any]]:
    """The image part for `/image PATH`, or [] with a one-line reason (the session goes on)."""
    if processor is None:
        out.write("(images need a vision-language model; this one reads text only)\n")
        return []
    try:
        image = parse_image(str(Path(path).expanduser().resolve()) if path else "", "/image", "chat")
    except PrefalignError as e:
        out.write(f"({e})\n")
        return []
    out.write(f"(image attached: {image.name})\n")
    return [{"type": "image", "image": image}]


def run_chat(cfg: ChatConfig, input_fn: Any = input, output: Any = None) -> list[dict[str, str]]:
    """One answer (--prompt) or an interactive session; returns the conversation."""
    _check(cfg)
    model, tokenizer, processor = load_for_inference(cfg.model_name_or_path, cfg.base_model_name_or_path,
                                                     cfg.tokenizer_name_or_path)
    resolve_chat_template(tokenizer, cfg.chat_template)
    if not getattr(tokenizer, "chat_template", None):
        raise PrefalignError("the tokenizer has no chat template; pass --chat_template (a built-in name: chatml, "
                             "llama3, mistral, gemma, phi3, deepseek, plain; or a .jinja file)", "--chat_template")
    if processor is not None:
        processor.chat_template = tokenizer.chat_template
    check_system_prompt(tokenizer, cfg.system_prompt)
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    out = output if output is not None else sys.stdout
    sampling = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p}
    if cfg.prompt is not None:
        messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else [])
        messages.append({"role": "user", "content": cfg.prompt})
        reply = generate_reply(model, tokenizer, messages, stream=out, processor=processor, **sampling)
        out.write("\n")
        return [*messages, {"role": "assistant", "content": reply}]
    return chat_loop(model, tokenizer, input_fn=input_fn, output=out, system_prompt=cfg.system_prompt,
                     processor=processor, **sampling)


def run_command(cfg: ChatConfig) -> None:
    """`prefalign chat`."""
    run_chat(cfg)
