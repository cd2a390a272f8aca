"""Sampled generation for on-policy training (`sample_groups`, `generate_completions`); the answers people read
(batched greedy answers, one streamed chat reply) are in `rollout.answers`.

Sampled groups. Each prompt is sampled `num_generations` times; its completions sit next to each other (rows
i·G .. i·G+G-1), the layout the group advantages expect. A group's prompt is run through the model once: the
prompts (left-padded, so that every row's next token is at the same position) are prefilled with a KV cache, and
the cache and the last-position logits are then repeated G times (`Cache.batch_repeat_interleave`), so a rollout
costs N prompt forwards, not N·G (`model.generate` on repeated prompts prefills every copy). Decoding then runs
one token per step for all rows, with the model's own forward and cache.

The sampler is ours rather than `model.generate` for two reasons besides the prefill: `torch.multinomial` over a
large vocabulary is slow on CPU (44 ms per step for 16 rows x 32k tokens, measured here), and the random draws
of a row must not depend on which other rows are sampled with it. A token is drawn by inverting the cumulative
distribution at a uniform number taken from `RowNoise`: one number per (step, row of the whole rollout), from a
generator seeded by the rollout. So a rollout sampled in pieces (by several processes, each its share of the
groups, or in chunks of `batch_size` rows) gets the tokens it would get sampled at once. Temperature, top-k and
top-p act as in transformers' logits warpers (in that order).

Completions come back right-padded, cut after the first EOS. Works the same for a plain transformers model, a
peft model, and a peft model inside `disable_adapter()` (the reference policy of a LoRA run). The model is put in
eval mode while it samples (no dropout in rollouts); each module gets its own mode back afterwards.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

from prefalign.data.templates import render
from prefalign.errors import PrefalignError
from prefalign.model.logprobs import unwrap_model
from prefalign.model.reference import eval_mode


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


# ---------------------------------------------------------------- sampled groups (on-policy training)


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn: temperature, then top-k (None or 0: off), then top-p, as transformers applies them."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None


class RowNoise:
    """The uniform numbers of a rollout's draws: one per (step, row) of all `total_rows` rows, from a generator
    seeded by `seed`; `take(first_row, rows)` is the share of rows first_row .. first_row+rows-1 of the next step.
    Rows sampled in pieces get the numbers they would get sampled together."""

    def __init__(self, seed: int, total_rows: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.total_rows = total_rows

    def take(self, first_row: int, rows: int, device: torch.device) -> Tensor:
        if first_row + rows > self.total_rows:
            raise ValueError(f"rows {first_row}..{first_row + rows - 1} outside a rollout of {self.total_rows}")
        step = torch.rand(self.total_rows, generator=self.generator, dtype=torch.float64)
        return step[first_row : first_row + rows].to(device)


def warp_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """Logits (B, V) after temperature, top-k and top-p; removed tokens are -inf (transformers' warpers)."""
    logits = logits.float() if params.temperature == 1.0 else logits.float() / params.temperature
    if params.top_k and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - params.top_p
        remove[:, -1] = False  # the most likely token always stays
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def draw_tokens(logits: Tensor, uniform: Tensor, block: int = 256) -> Tensor:
    """One token per row (B,) from logits (B, V), by inverting the cumulative distribution at `uniform` (B,) in
    [0, 1): the first token whose cumulative probability reaches (1 - u) of the total, never a zero-probability one.

    The cumulative sum runs in two levels, over blocks of `block` tokens and then inside the one block that holds
    the target, both in float64: as exact as a float64 cumsum over the vocabulary, at the cost of a float32 softmax.
    """
    probs = logits.softmax(-1)  # (B, V) float32
    rows, vocab = probs.shape
    blocks = torch.nn.functional.pad(probs, (0, -vocab % block)).view(rows, -1, block)  # (B, K, W)
    mass = blocks.sum(-1, dtype=torch.float64)  # (B, K)
    ends = mass.cumsum(-1)  # (B, K) cumulative mass at the end of each block
    target = (1.0 - uniform.to(ends.dtype)) * ends[:, -1]  # (B,) in (0, total]
    k = (ends < target.unsqueeze(1)).sum(-1).clamp(max=blocks.size(1) - 1)  # (B,) the block reaching the target
    before = torch.nn.functional.pad(ends[:, :-1], (1, 0))  # (B, K) mass before each block, as stored in `ends`
    inner = blocks[torch.arange(rows, device=probs.device), k].double().cumsum(-1)  # (B, W)
    # target > before[k] exactly (k's definition), so the rest is > 0; capping it at the block's own total keeps
    # summation-order rounding from stepping past the block's last non-zero token.
    rest = torch.minimum(target - before.gather(1, k.unsqueeze(1)).squeeze(1), inner[:, -1])  # (B,)
    j = (inner < rest.unsqueeze(1)).sum(-1)
    return k * block + j


@contextmanager
def decode_friendly_head(model: Any) -> Iterator[None]:
    """On CPU, hold the LM head's weight transposed in memory while decoding (same shape and values, a (H, V)
    contiguous buffer seen as (V, H)). MKL multiplies a few rows by a weight stored that way without first
    repacking the whole matrix: 8.9 instead of 12.5 ms per decoding step of 16 rows with a 32k x 256 head (the GRPO
    benchmark's), the logits unchanged. Only for a plain float32 nn.Linear head that is trained: its gradient and
    AdamW's two moments already take three times the copy at the step's peak, so holding it during sampling does not
    raise that peak; a frozen head (LoRA) keeps its layout. Nothing changes on other devices or for sharded heads."""
    inner = unwrap_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not (type(head) is torch.nn.Linear and isinstance(weight, torch.nn.Parameter) and weight.requires_grad
            and type(weight.data) is Tensor and weight.device.type == "cpu" and weight.dtype == torch.float32
            and weight.is_contiguous() and not hasattr(weight, "ds_id")):
        yield
        return
    original = weight.data
    weight.data = original.t().contiguous().t()
    try:
        yield
    finally:
        weight.data = original


@torch.no_grad()
def sample_groups(
    model: Any, prompt_ids: Sequence[Sequence[int]], num_generations: int, params: SamplingParams, *,
    eos_token_ids: Sequence[int], pad_token_id: int, noise: RowNoise, first_row: int = 0,
    all_done: Callable[[Tensor], bool] | None = None,
) -> Tensor:
    """Completion ids (N·G, T) of `num_generations` samples of each prompt, the prompt prefilled once per group.

    Row r of the result (prompt r // G) draws with the noise of rollout row `first_row + r`. Finished rows are
    padded with `pad_token_id` after their EOS; decoding stops when `all_done(done)` says so, by default when
    every row has finished (a sharded model passes a collective, so that every process runs as many forwards).
    T <= params.max_new_tokens. The model is in whatever mode and head layout the caller set (see
    `generate_completions`).
    """
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in left_pad([list(p) for p in prompt_ids], pad_token_id))  # (N, Tp)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate derives from a left-padded mask
    inner = unwrap_model(model)
    cache = DynamicCache(config=inner.config)
    # logits_to_keep=1 when the model takes it: the LM head then runs on the last position only
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(inner.forward).parameters else {}
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                   **extra).logits[:, -1]  # (N, V)
    # The group shares its prompt: copy its cache and next-token logits to the G rows instead of G prefills.
    cache.batch_repeat_interleave(num_generations)
    logits = logits.repeat_interleave(num_generations, dim=0)  # (B, V)
    mask = mask.repeat_interleave(num_generations, dim=0)  # (B, Tp)
    position = positions[:, -1:].repeat_interleave(num_generations, dim=0)  # (B, 1)
    rows = logits.size(0)
    eos = torch.tensor(list(eos_token_ids), device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    all_done = all_done or (lambda finished: bool(finished.all()))
    tokens: list[Tensor] = []
    for step in range(params.max_new_tokens):
        token = draw_tokens(warp_logits(logits, params), noise.take(first_row, rows, device))
        token = token.masked_fill(done, pad_token_id)  # (B,)
        tokens.append(token)
        done = done | torch.isin(token, eos)
        if step == params.max_new_tokens - 1 or all_done(done):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        logits = model(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=position, cache=cache,
                       use_cache=True, **extra).logits[:, -1]
    return torch.stack(tokens, dim=1)  # (B, T)


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
    first_row: int = 0,
    total_rows: int | None = None,
    all_done: Callable[[Tensor], bool] | None = None,
) -> Rollout:
    """Sample `num_generations` completions of at most `max_completion_length` tokens for every prompt
    (`sample_groups`), cut after the first EOS and decoded.

    `top_k` None or 0 disables top-k; `seed` makes the sampling reproducible (default: a draw from the global RNG);
    `batch_size` caps the rows sampled together (whole groups; default: all at once), which does not change the
    result. These prompts may be a share of a larger rollout of `total_rows` rows whose first row here is
    `first_row`: each row then samples what it would in the whole rollout. EOS defaults to the tokenizer's.
    """
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise PrefalignError("every prompt needs at least one token", "generate_completions")
    if temperature <= 0:
        raise PrefalignError(f"temperature must be > 0 for sampling, got {temperature}", "--temperature")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_ids(tokenizer, eos_token_id)
    params = SamplingParams(max_completion_length, temperature, top_p, top_k)
    rows = len(prompt_ids) * num_generations
    seed = int(torch.randint(0, 2**62, ())) if seed is None else seed
    per_call = max(1, (batch_size or rows) // num_generations)  # prompts per sampling call
    chunks = []
    with eval_mode(model), decode_friendly_head(model):  # once for all chunks
        for start in range(0, len(prompt_ids), per_call):
            noise = RowNoise(seed, total_rows or first_row + rows)  # each chunk replays the rollout's draws
            chunks.append(sample_groups(model, prompt_ids[start : start + per_call], num_generations, params,
                                        eos_token_ids=eos, pad_token_id=pad, noise=noise,
                                        first_row=first_row + start * num_generations, all_done=all_done))
    width = max(c.size(1) for c in chunks)
    completion_ids = torch.cat([torch.nn.functional.pad(c, (0, width - c.size(1)), value=pad) for c in chunks])
    completion_mask, is_truncated = completion_mask_from_eos(completion_ids, eos)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad)  # nothing after the first EOS
    lengths = completion_mask.sum(dim=1).tolist()
    texts = tokenizer.batch_decode([row[:n] for row, n in zip(completion_ids.tolist(), lengths)],
                                   skip_special_tokens=True)
    ids, mask = left_pad([p for p in prompt_ids for _ in range(num_generations)], pad)
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
