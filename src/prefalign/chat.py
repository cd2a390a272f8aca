"""Talk to a model: one reply from a conversation (`generate_reply`) and an interactive loop (`chat_loop`).

Loading a model or LoRA adapter by path is the CLI's business (`prefalign chat`); these functions take a loaded
transformers model and tokenizer, so that the demo and the tests can call them directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TextIO

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from prefalign.data.types import Message
from prefalign.errors import PrefalignError

Stream = Callable[[str], Any] | TextIO


class _CallbackStreamer(TextStreamer):
    """TextStreamer that hands each finished piece of text to a callable instead of printing it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, sink: Callable[[str], Any]) -> None:
        # skip_prompt: only the reply is streamed; skip_special_tokens: <|im_end|> is not shown
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.sink = sink

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.sink(text)


def _sink(stream: Stream) -> Callable[[str], Any]:
    if callable(stream):
        return stream
    if hasattr(stream, "write"):

        def write(text: str) -> None:
            stream.write(text)
            stream.flush()

        return write
    raise PrefalignError(f"stream must be a callable or a writable file, not {type(stream).__name__}", "stream")


def generate_reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stream: Stream | None = None,
) -> str:
    """The assistant's next message for `messages` (chat template with the generation prompt).

    Greedy when temperature == 0, else sampling with `temperature` and `top_p`. With `stream`, a callable or a
    file, the reply is also passed on piece by piece as it is generated; the pieces concatenate to the result.
    """
    if temperature < 0:
        raise PrefalignError(f"temperature must be >= 0, got {temperature}", "--temperature")
    if not 0 < top_p <= 1:
        raise PrefalignError(f"top_p must be in (0, 1], got {top_p}", "--top_p")
    if getattr(tokenizer, "chat_template", None) is None:
        raise PrefalignError("the tokenizer has no chat template; pass --chat_template", "tokenizer")
    inputs = tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}  # input_ids, attention_mask: (1, T)
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    )
    streamer = _CallbackStreamer(tokenizer, _sink(stream)) if stream is not None else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                streamer=streamer,
                **sampling,
            )  # (1, T + new)
    finally:
        model.train(was_training)
    new_tokens = out[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True)


HELP = "Commands: /reset clears the conversation, /exit (or end of input) quits."


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
) -> list[Message]:
    """Read user turns from `input_fn` until /exit or EOF, streaming each reply to `output`; returns the history.

    The history keeps every turn since the last /reset, so each reply sees the whole conversation.
    """
    import sys

    out = output if output is not None else sys.stdout
    start: list[Message] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    history: list[Message] = list(start)
    out.write(HELP + "\n")
    while True:
        try:
            line = input_fn(prompt)
        except EOFError:
            out.write("\n")
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            history = list(start)
            out.write("(conversation cleared)\n")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        reply = generate_reply(
            model, tokenizer, history, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stream=out
        )
        out.write("\n")
        history.append({"role": "assistant", "content": reply})
    return history
