"""Generation, in every form the commands need: sampled groups for on-policy training (`generate_completions`),
batched greedy answers for evaluation (`greedy_completions`), and one streamed chat reply (`generate_reply`).

Sampling for on-policy training (GRPO, RLOO, PPO) uses `model.generate` and the KV cache.

Each prompt is sampled `num_generations` times; its completions sit next to each other (rows i·G .. i·G+G-1),
the layout the group advantages expect. Prompts are left-padded so that every row's next token is at the same
position; completions come back right-padded, cut after the first EOS.

Works the same for a plain transformers model, a peft model, and a peft model inside `disable_adapter()`
(the reference policy of a LoRA run). The model is put in eval mode while it samples (no dropout in rollouts)
and returned to the mode it was in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from prefalign.data.content import images_of
from prefalign.data.templates import render, require_chat_template
from prefalign.data.types import Message
from prefalign.errors import PrefalignError

Stream = Callable[[str], Any] | TextIO


@dataclass
class Rollout:
    """Sampled completions. N prompts x G generations = B rows, grouped by prompt."""

    prompt_ids: Tensor  # (B, Tp) left-padded with pad_token_id
    prompt_mask: Tensor  # (B, Tp) 1 on real prompt tokens
    completion_ids: Tensor  # (B, Tc) right-padded with pad_token_id after the first EOS
    completion_mask: Tensor  # (B, Tc) 1 on tokens up to and including the first EOS
    is_truncated: Tensor  # (B,) bool: no EOS within max_completion_length
    texts: list[str]  # decoded completions (special tokens skipped)

    @property
    def completion_lengths(self) -> Tensor:
        return self.completion_mask.sum(dim=1)  # (B,)


def left_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token lists to the longest: ids (B, T) and attention mask (B, T)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def completion_mask_from_eos(completion_ids: Tensor, eos_token_ids: list[int]) -> tuple[Tensor, Tensor]:
    """Mask (B, T) of tokens up to and including the first EOS, and is_truncated (B,) where there is none."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))  # (B, T)
    width = completion_ids.size(1)
    # first EOS position, or T for rows without one
    first_eos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), torch.full_like(is_eos[:, 0], width, dtype=torch.long))
    positions = torch.arange(width, device=completion_ids.device).unsqueeze(0)  # (1, T)
    mask = (positions <= first_eos.unsqueeze(1)).long()
    return mask, ~is_eos.any(dim=1)


def mask_truncated_completions(completion_mask: Tensor, is_truncated: Tensor) -> Tensor:
    """Zero the mask of completions that hit the length limit, so they add no loss (TRL's option of that name)."""
    return completion_mask * (~is_truncated.bool()).unsqueeze(1).to(completion_mask.dtype)


def _eos_ids(tokenizer: Any, eos_token_id: int | list[int] | None) -> list[int]:
    ids = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    if ids is None:
        raise PrefalignError("the tokenizer has no EOS token, so completions could never stop", "--model_name_or_path")
    return [ids] if isinstance(ids, int) else list(ids)


def _generation_config(
    *, max_completion_length: int, temperature: float, top_p: float, top_k: int | None,
    eos: list[int], pad: int, extra: dict[str, Any],
) -> GenerationConfig:
    if temperature <= 0:
        raise PrefalignError(f"temperature must be > 0 for sampling, got {temperature}", "--temperature")
    settings: dict[str, Any] = {
        "do_sample": True, "max_new_tokens": max_completion_length, "temperature": temperature, "top_p": top_p,
        "top_k": top_k or 0, "repetition_penalty": 1.0, "eos_token_id": eos, "pad_token_id": pad,
        "use_cache": True,
    }
    settings.update(extra)  # e.g. min_p, repetition_penalty
    return GenerationConfig(**settings)


@torch.no_grad()
def generate_completions(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    *,
    num_generations: int,
    max_completion_length: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    eos_token_id: int | list[int] | None = None,
    batch_size: int | None = None,
    **generation_kwargs: Any,
) -> Rollout:
    """Sample `num_generations` completions of at most `max_completion_length` tokens for every prompt.

    `top_k` None or 0 disables top-k; `seed` makes the sampling reproducible without touching the global RNG;
    `batch_size` caps the rows per `generate` call (default: all at once); extra keyword arguments go to the
    GenerationConfig. EOS defaults to the tokenizer's.
    """
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise PrefalignError("every prompt needs at least one token", "generate_completions")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_ids(tokenizer, eos_token_id)
    config = _generation_config(
        max_completion_length=max_completion_length, temperature=temperature, top_p=top_p, top_k=top_k,
        eos=eos, pad=pad, extra=generation_kwargs,
    )
    repeated = [p for p in prompt_ids for _ in range(num_generations)]
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in left_pad(repeated, pad))  # (B, Tp)
    step = batch_size or len(repeated)

    was_training = model.training
    model.eval()
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            chunks = [
                model.generate(
                    input_ids=ids[i : i + step], attention_mask=mask[i : i + step],
                    generation_config=config,
                )[:, ids.size(1) :]
                for i in range(0, len(repeated), step)
            ]
    finally:
        model.train(was_training)

    width = max(c.size(1) for c in chunks)
    completion_ids = torch.cat([torch.nn.functional.pad(c, (0, width - c.size(1)), value=pad) for c in chunks])
    completion_mask, is_truncated = completion_mask_from_eos(completion_ids, eos)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad)  # nothing after the first EOS
    lengths = completion_mask.sum(dim=1).tolist()
    texts = [tokenizer.decode(row[:n].tolist(), skip_special_tokens=True) for row, n in zip(completion_ids, lengths)]
    return Rollout(ids, mask, completion_ids, completion_mask, is_truncated, texts)


# ---------------------------------------------------------------- greedy answers (evaluation)


def chat_prompt_ids(tokenizer: Any, prompts: Sequence[Any]) -> list[list[int]]:
    """Token ids of each prompt (a string is one user turn; a message list is used as is) with the generation
    prompt, encoded without special tokens since the template writes its own (as SFT and DPO encode it)."""
    out = []
    for p in prompts:
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        text = render(tokenizer, messages, add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


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
