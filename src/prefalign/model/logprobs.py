"""Per-token log-probabilities of completions, without ever holding [batch, seq, vocab] float32 logits.

A preference step only needs log p(token) at the completion tokens. Computing `model(ids).logits` first
materialises a [2B, T, V] tensor (and autograd saves its float32 log-softmax for backward): for Qwen2.5's
152k vocabulary at 2B=16, T=2048 that is 20 GB. Instead we

1. run the model's own forward (so DDP / DeepSpeed / peft wrappers see a normal call) with
   `logits_to_keep=1`, so the LM head runs on one position per row, and capture the decoder's final hidden
   states with a forward hook;
2. gather the hidden states at the positions that *predict* completion tokens (position t-1 predicts t);
3. apply the LM head (+ the model's logit scale / soft-capping) and log-softmax in chunks of `chunk_size`
   positions (fewer when a chunk's logits would pass HEAD_CHUNK_BYTES), each chunk an autograd Function with
   its own backward (`_HeadChunk`): the first chunks' logits, up to HEAD_KEEP_BYTES in all, are kept for
   backward; past that autograd keeps only a chunk's [chunk, H] inputs and its logits are recomputed one chunk at
   a time in backward (a ZeRO-3 head keeps `torch.utils.checkpoint`).

Models whose head we do not know how to reproduce (prompt-learning peft adapters, model types listed in
`FULL_FORWARD_MODEL_TYPES`, models without `logits_to_keep`) fall back to the full forward's logits at the
same positions: correct, but not memory-lean.

Layouts other than "padded" (packed, shared-prompt) are added by `register_layout`; they reuse
`score_positions`, which does steps 1-3 for any (row, column) positions of one forward call.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from peft import PeftModel
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from prefalign.errors import PrefalignError

# Model types whose LM head does something we do not replicate (extra vocab slicing, custom soft-cap
# modules): they get the full forward's logits.
FULL_FORWARD_MODEL_TYPES = frozenset({"inkling2"})

# The most float32 logits one scoring chunk holds (positions x vocabulary x 4 bytes).
HEAD_CHUNK_BYTES = 64 * 2**20
# On CPU, less: glibc's malloc hands out a buffer above its mmap threshold (which adapts up to 32 MiB) as fresh pages
# that the kernel must fault in one by one, so every chunk's [n, V] buffers would cost their page faults again;
# at most 16 MiB they are reused from the heap (forward and backward of a GRPO benchmark micro-batch, 32k
# vocabulary, logits recomputed: 1.03-1.08 s -> 0.92-0.99 s).
# At least CPU_MIN_CHUNK_POSITIONS positions though: each chunk reads the whole head weight, which for a large
# vocabulary costs more than the page faults saved.
CPU_HEAD_CHUNK_BYTES = 16 * 2**20
CPU_MIN_CHUNK_POSITIONS = 64
# The logits of one forward's first chunks, those that lie wholly within this many bytes of logits, are kept for
# backward instead of recomputed: a bounded cost in memory (the peak grows by at most this) for one head matmul per kept position
# (a micro-batch of the GRPO benchmark, 512 positions x 32k vocabulary, is kept whole: its backward 0.60 -> 0.43 s).
HEAD_KEEP_BYTES = 64 * 2**20


@dataclass
class CompletionLogps:
    """Completion-token log-probs of a batch; rows are the B chosen completions, then the B rejected ones."""

    token_logps: Tensor
    """(2B, Tc) float32 log-prob of each completion token, left-aligned, 0 past the completion's end."""
    mask: Tensor
    """(2B, Tc) bool, True at real completion tokens."""
    logits_mean_sum: Tensor
    """(2B,) sum over completion tokens of the mean (over the vocabulary) logit; no grad."""
    wpo_adjust: Tensor | None = None
    """(2B, Tc) logsumexp(2 * log_softmax) at each completion token (WPO's normaliser); no grad."""
    entropy: Tensor | None = None
    """(2B, Tc) entropy of the next-token distribution at each completion token (`with_entropy`); no grad."""


@dataclass
class TokenScores:
    """Scores of N selected positions, flat: what a layout scatters back into CompletionLogps."""

    logps: Tensor  # (N,) float32, differentiable
    mean_logits: Tensor  # (N,) float32, detached
    wpo_adjust: Tensor | None  # (N,) float32, detached
    entropy: Tensor | None = None  # (N,) float32, detached (with_entropy)


LayoutFn = Callable[..., CompletionLogps]
_LAYOUTS: dict[str, LayoutFn] = {}


def register_layout(name: str, fn: LayoutFn) -> None:
    """Make `completion_logps` accept batches with `batch["layout"] == name`.

    `fn(model, batch, *, with_wpo: bool, chunk_size: int) -> CompletionLogps`; build it on `score_positions`
    and `left_align` so it inherits the memory-lean head.
    """
    _LAYOUTS[name] = fn


def completion_logps(
    model: nn.Module, batch: dict[str, Any], *, with_wpo: bool = False, chunk_size: int = 1024,
    with_entropy: bool = False, temperature: float = 1.0,
) -> CompletionLogps:
    """Log-probs of every completion token of `batch` under `model`, dispatched on `batch["layout"]`.

    `with_entropy` also returns per-token entropies (on-policy RL metrics and entropy masking); `temperature`
    divides the logits first, so that the log-probs are those of the distribution a sampler at that
    temperature draws from. Both are supported by the padded and packed layouts and are passed on only when set.
    """
    layout = batch.get("layout")
    if layout not in _LAYOUTS:
        raise ValueError(f"unknown batch layout {layout!r}; registered: {sorted(_LAYOUTS)}")
    extra: dict[str, Any] = {}
    if with_entropy:
        extra["with_entropy"] = True
    if temperature != 1.0:
        extra["temperature"] = temperature
    return _LAYOUTS[layout](model, batch, with_wpo=with_wpo, chunk_size=chunk_size, **extra)


# ---------------------------------------------------------------- finding the backbone and the head


@dataclass
class _Head:
    decoder: nn.Module  # returns the final (normed) hidden states
    lm_head: nn.Module
    scale: float  # logits are multiplied by this (Cohere's logit_scale, 1 / Granite's logits_scaling)
    softcap: float | None  # Gemma-2 style tanh soft-capping of the final logits

    @property
    def vocab(self) -> int:
        """The logits' width, 0 when the head does not say. out_features, not weight.shape: a 4-bit head's weight
        is stored packed."""
        width = getattr(self.lm_head, "out_features", None)
        return width if isinstance(width, int) and width > 0 else 0


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / DeepSpeed / peft wrappers (LoRA layers stay injected)."""
    inner = extract_model_from_parallel(model)
    if isinstance(inner, PeftModel):
        inner = inner.get_base_model()
    return inner


def is_prompt_learning(model: nn.Module) -> bool:
    """Whether `model` is a peft prompt-learning model (virtual tokens: positions differ from the input's)."""
    inner = extract_model_from_parallel(model)
    return isinstance(inner, PeftModel) and inner.active_peft_config.is_prompt_learning


def resolve_head(model: nn.Module) -> _Head | None:
    """The decoder and LM head of `model`, or None when only the full forward is known to be right."""
    if is_prompt_learning(model):
        return None  # virtual tokens shift positions; let peft's own forward handle them
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "model_type", None) in FULL_FORWARD_MODEL_TYPES:
        return None
    if "logits_to_keep" not in inspect.signature(inner.forward).parameters:
        return None  # old/custom model: its forward would build the full logits anyway
    try:
        decoder, lm_head = inner.get_decoder(), inner.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if not isinstance(decoder, nn.Module) or not isinstance(lm_head, nn.Module):
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = float(getattr(inner, "logit_scale", 1.0) or 1.0)  # Cohere multiplies by model.logit_scale
    if getattr(text_config, "logits_scaling", None):  # Granite divides by config.logits_scaling
        scale /= float(text_config.logits_scaling)
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return _Head(decoder, lm_head, scale, float(softcap) if softcap else None)


def head_chunk_size(head: _Head | None, chunk_size: int) -> int:
    """Positions per head chunk. A chunk's [n, V] float32 logits and their temporaries are the peak of the forward
    and of its recompute in backward: keep a chunk within HEAD_CHUNK_BYTES (e.g. 110 positions for Qwen2's 152k
    vocabulary; on CPU within CPU_HEAD_CHUNK_BYTES, but at least CPU_MIN_CHUNK_POSITIONS). Heads of unknown width
    (and the full-forward fallback, head None) keep chunk_size."""
    vocab = head.vocab if head is not None else 0
    if not vocab:
        return chunk_size
    weight = next(head.lm_head.parameters(), None)
    if weight is not None and weight.device.type == "cpu":
        positions = max(CPU_MIN_CHUNK_POSITIONS, CPU_HEAD_CHUNK_BYTES // (4 * vocab))
    else:
        positions = HEAD_CHUNK_BYTES // (4 * vocab)
    return max(1, min(chunk_size, positions))


def head_logits(head: _Head, hidden: Tensor) -> Tensor:
    """(n, H) hidden states -> (n, V) float32 logits exactly as the model's forward would post-process them."""
    logits = head.lm_head(hidden).float()
    if head.scale != 1.0:
        logits = logits * head.scale
    if head.softcap is not None:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    return logits


# ---------------------------------------------------------------- scoring selected positions


def _score_chunk(
    logits_fn: Callable[[Tensor], Tensor], inputs: Tensor, targets: Tensor, with_wpo: bool,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Log-prob of `targets` for one chunk, and the other scores; the [n, V] logits live only inside this call."""
    return _scores(logits_fn(inputs), targets, with_wpo, with_entropy)[:4]


def _scores(logits: Tensor, targets: Tensor, with_wpo: bool,
            with_entropy: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(logps, mean logit, WPO's normaliser, entropy, logsumexp) of each row of (n, V) float32 logits; only logps
    is differentiable."""
    with torch.no_grad():
        # The logsumexp as torch computes it (max, then log of the sum of exp(logit - max), plus the max: bit-identical
        # to logits.logsumexp), keeping the exponentials for the entropy: one [n, V] pass and temporary for both.
        top = logits.amax(-1, keepdim=True)  # (n, 1)
        exp = (logits - top).exp_()  # (n, V)
        total = exp.sum(-1)  # (n,)
        lse = total.log() + top.squeeze(-1)  # (n,)
        mean_logits = logits.mean(-1)  # (n,)
        # WPO: logsumexp over the vocabulary of 2 * log_softmax, i.e. log sum_v p_v^2.
        wpo = (2 * (logits - lse[:, None])).logsumexp(-1) if with_wpo else torch.zeros_like(lse)
        # H = lse - sum_v p_v logit_v with p = exp / total: within 7e-6 of a float64 entropy on a 32k vocabulary
        # (randn x 3 logits), where a softmax and then one batched dot product per row was off by 9e-4 (its
        # sequential float32 sum); 17.8 instead of 23.5 ms for 128 positions here.
        entropy = lse - row_dot(exp, logits) / total if with_entropy else torch.zeros_like(lse)
        del exp
    if logits.requires_grad:  # the checkpointed and full-logits paths: autograd's logsumexp, the same value
        lse_for_grad = logits.logsumexp(-1)
        logps = logits.gather(-1, targets[:, None]).squeeze(-1) - lse_for_grad  # (n,)
    else:
        logps = logits.gather(-1, targets[:, None]).squeeze(-1) - lse  # (n,)
    return logps, mean_logits, wpo, entropy, lse


def row_dot(a: Tensor, b: Tensor) -> Tensor:
    """(n,) dot products of the rows of two contiguous (n, V) tensors, summed in blocks of up to 256 terms and then
    across blocks: off by 1.8e-4 on 32k randn x randn terms, where one batched dot product per row (a sequential
    float32 sum) is off by 2.4e-3, and without the [n, V] temporary of (a * b).sum(-1), which is what a width with
    no block of at least 32 dividing it gets."""
    n, width = a.shape
    block = math.gcd(width, 256)
    if block < 32 or not (a.is_contiguous() and b.is_contiguous()):
        return torch.linalg.vecdot(a, b)
    k = width // block
    return torch.bmm(a.view(n * k, 1, block), b.view(n * k, block, 1)).view(n, k).sum(-1)


class _HeadChunk(torch.autograd.Function):
    """One chunk's scores with a hand-written backward: the log-softmax gradient, g·(onehot(target) − softmax), is
    written from the saved logsumexp into one [n, V] buffer, over the chunk's logits kept from the forward (`keep`)
    or recomputed (as a checkpoint would, but only the logits).

    Torch's checkpoint of `_score_chunk` would re-run all of it in backward (the logsumexp, the mean logit, WPO's and
    the entropy's extra passes) and then run autograd's logsumexp and gather backwards, each with [n, V]
    temporaries: on a 32k vocabulary that was a third of the head's time and most of its backward peak (measured in
    benchmarks/grpo_bench.py). The gradient is the expression autograd's LogsumexpBackward evaluates, so results are
    bit-identical (tested). `params` are the head's trainable tensors, passed as inputs so that their gradients
    reach them through autograd's usual accumulation (DDP and ZeRO-2 hooks included)."""

    @staticmethod
    def forward(ctx: Any, logits_fn: Callable[[Tensor], Tensor], inputs: Tensor, targets: Tensor, with_wpo: bool,
                with_entropy: bool, keep: bool, *params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        ctx.kept = None
        if keep:  # the logits with their graph to a detached input and the head's parameters, for backward
            x = inputs.detach().requires_grad_(ctx.needs_input_grad[1])
            with torch.enable_grad():
                logits = logits_fn(x)
            ctx.kept = (x, logits)
        else:
            logits = logits_fn(inputs)
        with torch.no_grad():
            logps, mean_logits, wpo, entropy, lse = _scores(logits.detach(), targets, with_wpo, with_entropy)
        ctx.save_for_backward(inputs, targets, lse, *params)
        ctx.logits_fn = logits_fn
        ctx.autocast = _autocast_state(inputs.device.type)
        ctx.mark_non_differentiable(mean_logits, wpo, entropy)
        return logps, mean_logits, wpo, entropy

    @staticmethod
    def backward(ctx: Any, grad_logps: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        inputs, targets, lse, *params = ctx.saved_tensors
        needs_x, needs_params = ctx.needs_input_grad[1], ctx.needs_input_grad[6:]
        if ctx.kept is not None:
            x, logits = ctx.kept
            ctx.kept = None
        else:
            x = inputs.detach().requires_grad_(needs_x)
            device_type, enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(device_type, enabled=enabled, dtype=dtype):
                logits = ctx.logits_fn(x)  # (n, V), with a graph to x and the head's parameters
        g = grad_logps.to(logits.dtype)[:, None]  # (n, 1)
        grad_logits = (logits.detach() - lse[:, None]).exp_().mul_(-g)  # -g·softmax: the logsumexp's part
        grad_logits.scatter_add_(1, targets[:, None], g)  # +g at the target: the gather's part
        wrt = [t for t, needs in zip([x, *params], [needs_x, *needs_params]) if needs]
        grads = iter(torch.autograd.grad(logits, wrt, grad_logits, allow_unused=True))
        grad_x = next(grads) if needs_x else None
        return (None, grad_x, None, None, None, None, *(next(grads) if needs else None for needs in needs_params))


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    """What backward's recompute needs to run the head under the autocast the forward ran under."""
    if device_type not in ("cpu", "cuda"):
        return device_type, False, torch.float32
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _score_in_chunks(
    logits_fn: Callable[[Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    with_wpo: bool,
    chunk_size: int,
    recompute: bool,
    with_entropy: bool = False,
    collective: str | None = None,
    params: Sequence[Tensor] = (),
    vocab: int = 0,
) -> TokenScores:
    """Score N positions `chunk_size` at a time; with `recompute`, backward recomputes each chunk's logits instead
    of keeping them, past the first HEAD_KEEP_BYTES of `vocab`-wide logits (`params`: the trainable tensors
    `logits_fn` reads). With `collective` (a ZeRO-3 head, "trained" or "frozen"), every process runs as many chunks
    as the one with the most."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    use_recompute = recompute and torch.is_grad_enabled() and (
        inputs.requires_grad or any(p.requires_grad for p in params))
    # A frozen ZeRO-3 head (LoRA): the non-reentrant recompute would see its released (empty) weight, so the
    # reentrant one, which runs the head's forward hooks (the gather) again, is used (measured, deepspeed 0.19.8).
    # A ZeRO-3 head keeps torch's checkpoint: its parameters are empty partitions outside the head's own hooks, so
    # they cannot be inputs whose gradients a Function returns.
    reentrant = collective == "frozen"
    trainable = [p for p in params if p.requires_grad]
    kept_positions = HEAD_KEEP_BYTES // (4 * vocab) if vocab > 0 else 0  # the first ones keep their logits

    def score(x: Tensor, t: Tensor, keep: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if use_recompute and collective is None:
            return _HeadChunk.apply(logits_fn, x, t, with_wpo, with_entropy, keep, *trainable)
        if use_recompute:
            # Checkpoint: backward re-runs the head on this chunk instead of keeping its logits.
            return checkpoint(_score_chunk, logits_fn, x, t, with_wpo, with_entropy, use_reentrant=reentrant)
        return _score_chunk(logits_fn, x, t, with_wpo, with_entropy)

    n = inputs.shape[0]
    parts = [score(inputs[s : s + chunk_size], targets[s : s + chunk_size], min(s + chunk_size, n) <= kept_positions)
             for s in range(0, n, chunk_size)]
    # Padding chunks (one zero row, weight 0) so that every process calls the head as often, forward and backward.
    padding = [score(inputs.new_zeros(1, inputs.shape[-1]) + inputs.sum() * 0, targets.new_zeros(1))[0]
               for _ in range(_most_chunks(len(parts), inputs.device) - len(parts) if collective else 0)]
    pad = sum(p.sum() for p in padding) * 0.0 if padding else None
    if not parts:  # no completion tokens at all
        empty = inputs.new_zeros(0, dtype=torch.float32)
        return TokenScores(empty + inputs.sum() * 0 + (0.0 if pad is None else pad), empty,
                           empty if with_wpo else None, empty if with_entropy else None)
    logps, means, wpo, entropy = (torch.cat(p) for p in zip(*parts))
    if pad is not None:
        logps = logps + pad
    return TokenScores(logps, means, wpo if with_wpo else None, entropy if with_entropy else None)


def _most_chunks(count: int, device: torch.device) -> int:
    """The largest chunk count of any process (an all-reduce)."""
    most = torch.tensor([count], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return int(most.item())


def head_collective(head: nn.Module) -> str | None:
    """"trained" or "frozen" when calling `head` is a collective: under DeepSpeed ZeRO-3 each call gathers its
    partitioned weight from every process, so all processes must call it equally often (otherwise they wait on
    each other for ever); None otherwise."""
    params = list(head.parameters())
    if not (torch.distributed.is_initialized() and any(hasattr(p, "ds_id") for p in params)):
        return None
    return "trained" if any(p.requires_grad for p in params) else "frozen"


def backbone_hidden(model: nn.Module, head: _Head, forward_kwargs: dict[str, Any]) -> Tensor:
    """Final hidden states (rows, T, H) from the model's own forward, with the LM head run on one position."""
    captured: list[Tensor] = []

    def keep(_module: nn.Module, _args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = head.decoder.register_forward_hook(keep)
    try:
        model(**forward_kwargs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected the decoder to run once per forward, it ran {len(captured)} times")
    return captured[0]


def score_positions(
    model: nn.Module,
    forward_kwargs: dict[str, Any],
    rows: Tensor,
    cols: Tensor,
    targets: Tensor,
    *,
    with_wpo: bool = False,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    temperature: float = 1.0,
) -> TokenScores:
    """One forward of `model(**forward_kwargs)`; score `targets[i]` from the output at (rows[i], cols[i]).

    (rows, cols) are the positions whose output *predicts* the target, i.e. one before the target token.
    Logits are divided by `temperature` before the softmax.
    """
    head = resolve_head(model)
    if head is None:
        logits = model(**forward_kwargs, use_cache=False).logits  # (rows, T, V): the non-lean fallback
        return _score_in_chunks(
            lambda x: x.float() / temperature, logits[rows, cols], targets,
            with_wpo=with_wpo, chunk_size=chunk_size, recompute=False, with_entropy=with_entropy,
        )  # fmt: skip
    hidden = backbone_hidden(model, head, forward_kwargs)  # (rows, T, H)
    chunk_size = head_chunk_size(head, chunk_size)

    def logits_fn(h: Tensor) -> Tensor:
        logits = head_logits(head, h)
        return logits if temperature == 1.0 else logits / temperature

    return _score_in_chunks(
        logits_fn, hidden[rows, cols], targets,
        with_wpo=with_wpo, chunk_size=chunk_size, recompute=True, with_entropy=with_entropy,
        collective=head_collective(head.lm_head), params=list(head.lm_head.parameters()),
        vocab=head.vocab,
    )  # fmt: skip


def left_align(values: Tensor, rows: Tensor, slots: Tensor, num_rows: int, width: int) -> Tensor:
    """Scatter flat `values` to a (num_rows, width) tensor at (rows, slots), zeros elsewhere (differentiable)."""
    out = values.new_zeros((num_rows, width))
    return out.index_put((rows, slots), values)


# ---------------------------------------------------------------- the padded layout


def _padded_logps(
    model: nn.Module, batch: dict[str, Any], *, with_wpo: bool, chunk_size: int, with_entropy: bool = False,
    temperature: float = 1.0,
) -> CompletionLogps:
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]  # (2B, T)
    completion = batch["completion_mask"].bool()  # (2B, T)
    if completion[:, 0].any():
        raise PrefalignError(
            "a completion starts at the first position, so no token predicts it; the prompt must not be empty",
            "batch",
        )
    num_rows = input_ids.shape[0]
    rows, cols = completion.nonzero(as_tuple=True)  # row-major, so each row's tokens stay in order
    forward_kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    forward_kwargs.update(batch.get("vision_inputs") or {})  # a VLM batch's image tensors (data.vision)
    scores = score_positions(
        model, forward_kwargs, rows, cols - 1, input_ids[rows, cols],
        with_wpo=with_wpo, chunk_size=chunk_size, with_entropy=with_entropy, temperature=temperature,
    )  # fmt: skip
    slots = (completion.cumsum(1) - 1)[rows, cols]  # index of each token within its completion
    lengths = completion.sum(1)  # (2B,)
    width = int(lengths.max()) if num_rows else 0
    return gather_scores(scores, rows, slots, num_rows, width)


def gather_scores(scores: TokenScores, rows: Tensor, slots: Tensor, num_rows: int, width: int) -> CompletionLogps:
    """Per-position scores (token k of row r at `slots[k]`) as left-aligned (num_rows, width) CompletionLogps;
    every layout ends here."""
    def align(values: Tensor | None) -> Tensor | None:
        return None if values is None else left_align(values, rows, slots, num_rows, width)

    return CompletionLogps(
        token_logps=align(scores.logps),
        mask=align(torch.ones_like(rows, dtype=torch.bool)),
        logits_mean_sum=scores.mean_logits.new_zeros(num_rows).index_add(0, rows, scores.mean_logits),
        wpo_adjust=align(scores.wpo_adjust),
        entropy=align(scores.entropy),
    )


register_layout("padded", _padded_logps)
