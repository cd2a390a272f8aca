"""The answers people read: batched greedy answers for evaluation and the demo (`greedy_completions`,
`greedy_answers`) and one chat reply streamed token by token (`generate_reply`), both rendered with the chat template
as training renders prompts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TextIO

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from prefalign.data.content import images_of
from prefalign.data.templates import render, require_chat_template
from prefalign.data.types import Message
from prefalign.errors import PrefalignError
from prefalign.rollout.generate import chat_prompt_ids, left_pad

Stream = Callable[[str], Any] | TextIO


@torch.no_grad()
def greedy_completions(model: Any, tokenizer: Any, prompts: Sequence[Any], *, batch_size: int = 128,
                       max_new_tokens: int = 16, desc: str | None = None) -> list[list[int]]:
    """Greedy completion token ids per prompt, cut after the first EOS (kept)."""
    model.eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids_all = chat_prompt_ids(tokenizer, prompts)
    out: list[list[int]] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None, leave=False):
        ids, mask = left_pad(ids_all[start:start + batch_size], pad)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=pad)  # (B, T + new)
        for row in gen[:, ids.shape[1]:].tolist():
            out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def greedy_answers(model: Any, tokenizer: Any, prompts: Sequence[Any], **kwargs: Any) -> list[str]:
    """Greedy completions of `prompts` as text (special tokens dropped)."""
    return [tokenizer.decode(c, skip_special_tokens=True) for c in greedy_completions(model, tokenizer, prompts, **kwargs)]


# ---------------------------------------------------------------- one chat reply, streamed


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
    processor: Any = None,
) -> str:
    """The assistant's next message for `messages` (chat template with the generation prompt; content parts as
    `data.templates.render` places them, image parts through a vision-language model's `processor`).

    Greedy when temperature == 0, else sampling with `temperature` and `top_p`. With `stream`, a callable or a
    file, the reply is also passed on piece by piece as it is generated; the pieces concatenate to the result.
    """
    if temperature < 0:
        raise PrefalignError(f"temperature must be >= 0, got {temperature}", "--temperature")
    if not 0 < top_p <= 1:
        raise PrefalignError(f"top_p must be in (0, 1], got {top_p}", "--top_p")
    require_chat_template(tokenizer)
    # rendered and encoded as training renders prompts (no special tokens added: the template writes its own);
    # a template error (e.g. a role it cannot render) is a one-line PrefalignError
    inputs = _reply_inputs(tokenizer, processor, list(messages))
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}  # input_ids, attention_mask: (1, T); image inputs
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



def _reply_inputs(tokenizer: Any, processor: Any, messages: list[Message]) -> dict[str, Tensor]:
    """The model inputs of one conversation: ids as the template writes them (no special tokens added: the template
    writes its own), with each image's tokens and pixels when there are images."""
    text = render(tokenizer, messages, add_generation_prompt=True)
    images = images_of(messages)
    if not images:
        return dict(tokenizer(text, add_special_tokens=False, return_tensors="pt"))
    if processor is None:
        raise PrefalignError("the conversation has an image, but the model has no image processor (a text-only "
                             "model)", "--model_name_or_path")
    pixels = [image.load() for image in images]
    out = processor(text=[text], images=[pixels], add_special_tokens=False, return_tensors="pt")
    return {k: v for k, v in out.items() if isinstance(v, Tensor)}
