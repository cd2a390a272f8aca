"""The forward of the packed / shared-prompt layout (`data.packing`): one row, no padding, prompts run once.

How the attention pattern reaches the model. transformers 5 models call
`ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v, mask, **kwargs)`, and every keyword
given to the model's forward travels down to that call. We register one attention function per base
implementation, `"prefalign_packed:<base>"`, and switch the model to it once (`install_packed_attention`):

- called with `prefalign_blocks=((q_start, q_end, prefix_start, prefix_end), ...)` it runs attention block
  by block: `[prompt+chosen]` as plain causal attention, `[rejected]` against `prompt ++ rejected` keys with a
  causal mask offset by the prompt. No [T, T] mask is built and no FLOP is spent on the pairs' cross terms;
- called without it (padded batches, generation) it hands the call to the base implementation unchanged, and
  the base's mask function builds the usual masks.

Why not the alternatives:
- a dense 4D mask over the packed row (the generic route transformers accepts as-is) costs O(T_row^2)
  attention with T_row = all tokens of the micro-batch; at 4 long pairs it is as many FLOPs as the linear
  layers, which eats most of what packing saves on CPU;
- a prompt forward whose KV cache (with grads) continues into the completions needs two launches, a cache
  copied per completion, and pads prompts and completions again to batch them;
- switching the implementation only around the forward would break gradient checkpointing, whose backward
  re-runs the layers after the forward returned. The installed function dispatches on the keyword instead,
  so a re-run sees the same blocks. `_attn_implementation` is not saved with the config.

Position ids restart for the rejected block, so rotary (or learned absolute) positions are what each
sequence would get in its own row; `supports_packing` rejects what the blocks cannot express (sliding
windows, soft-capped or sink attention, non-causal or multimodal models).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from prefalign.model.logprobs import (
    CompletionLogps,
    gather_scores,
    is_prompt_learning,
    register_layout,
    score_positions,
    unwrap_model,
)

PREFIX = "prefalign_packed:"
BLOCKS_KWARG = "prefalign_blocks"
BASE_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
Block = tuple[int, int, int, int]
# Multimodal families whose packed layout is tested equal to padded rows: Qwen2-VL's 3-D (M-RoPE) positions are
# rebuilt per block from its own get_rope_index; LLaVA's language model takes 1-D positions like a text model.
VERIFIED_MULTIMODAL = frozenset({"qwen2_vl", "llava"})


def _block_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, blocks: tuple[Block, ...], scaling: float | None,
    dropout: float,
) -> Tensor:
    """Attention of one packed row, block by block. query (1, H, T, D), key/value (1, Hkv, T, D) -> (1, T, H, D)."""
    groups = query.shape[1] // key.shape[1]
    outputs = []
    for q_start, q_end, p_start, p_end in blocks:
        q = query[:, :, q_start:q_end]  # (1, H, Lq, D)
        if p_end <= p_start:  # no prefix: ordinary causal attention; the fast kernels handle it with GQA
            k, v = key[:, :, q_start:q_end], value[:, :, q_start:q_end]
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=groups > 1
            )
        else:  # keys: the fully visible prefix, then the block itself causally
            k = torch.cat([key[:, :, p_start:p_end], key[:, :, q_start:q_end]], dim=2)  # (1, Hkv, Lp+Lq, D)
            v = torch.cat([value[:, :, p_start:p_end], value[:, :, q_start:q_end]], dim=2)
            if groups > 1:  # masked kernels do not all take enable_gqa; repeat like transformers' repeat_kv
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            n_q, n_p = q_end - q_start, p_end - p_start
            causal = torch.ones(n_q, n_q, dtype=torch.bool, device=q.device).tril()
            mask = torch.cat([causal.new_ones(n_q, n_p), causal], dim=1)  # (Lq, Lp+Lq)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
        outputs.append(out)
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()  # (1, T, H, D)


def _base_function(base: str, module: nn.Module) -> Callable[..., Any]:
    """The attention function the model would use under `base` (eager lives in the model's own module)."""
    if base != "eager":
        return ALL_ATTENTION_FUNCTIONS[base]
    return sys.modules[type(module).__module__].eager_attention_forward


def _make_dispatcher(base: str) -> Callable[..., Any]:
    def attention(
        module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
        scaling: float | None = None, dropout: float = 0.0, **kwargs: Any,
    ) -> tuple[Tensor, None]:
        blocks = kwargs.pop(BLOCKS_KWARG, None)
        if blocks is None:  # not a packed batch: exactly the base implementation
            return _base_function(base, module)(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        if query.shape[0] != 1 or blocks[-1][1] != query.shape[2]:
            raise ValueError("a packed batch is one row whose attention blocks cover all of it")
        return _block_attention(module, query, key, value, blocks, scaling, dropout), None

    return attention


def _config(model: nn.Module) -> Any:
    """The config whose attention implementation the packed layout switches: the text model's. On a
    vision-language model the top-level setter would propagate to the vision tower too, whose attention must
    stay the base implementation (its rows are images, not the packed row)."""
    config = unwrap_model(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def install_packed_attention(model: nn.Module) -> None:
    """Switch `model` to the packing-aware attention (idempotent; padded batches behave exactly as before)."""
    config = _config(model)
    current = config._attn_implementation
    if current.startswith(PREFIX):
        return
    name = PREFIX + current
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_dispatcher(current))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    config._attn_implementation = name


def uninstall_packed_attention(model: nn.Module) -> None:
    """Give `model` back its original attention implementation."""
    config = _config(model)
    if config._attn_implementation.startswith(PREFIX):
        config._attn_implementation = config._attn_implementation.removeprefix(PREFIX)


def supports_packing(model: nn.Module) -> tuple[bool, str]:
    """Whether the packed layout is exact for `model`; the reason says why not (for a one-line notice)."""
    if is_prompt_learning(model):
        return False, "prompt-learning adapters insert virtual tokens in front of every row"
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    if config is None:
        return False, f"{type(inner).__name__} has no transformers config"
    kind = getattr(config, "model_type", type(inner).__name__)
    multimodal = getattr(config, "vision_config", None) is not None or getattr(config, "audio_config", None) is not None
    config = _config(model)  # the text model's settings decide the attention pattern
    base = (config._attn_implementation or "eager").removeprefix(PREFIX)
    checks = [
        (getattr(inner, "_supports_attention_backend", False),
         f"{kind} does not route attention through transformers' AttentionInterface"),
        (base in BASE_IMPLEMENTATIONS, f"attention implementation {base!r} is not one of {BASE_IMPLEMENTATIONS}"),
        (getattr(config, "is_causal", True) and not getattr(config, "is_encoder_decoder", False),
         f"{kind} is not a causal decoder-only model"),
        (not multimodal or kind in VERIFIED_MULTIMODAL,
         f"{kind} is a multimodal family whose packed positions are not verified (verified: "
         f"{', '.join(sorted(VERIFIED_MULTIMODAL))})"),
        (set(getattr(config, "layer_types", None) or ["full_attention"]) == {"full_attention"}
         and not getattr(config, "use_sliding_window", False),
         f"{kind} uses sliding-window or non-standard attention layers"),
        (getattr(config, "attn_logit_softcapping", None) is None, f"{kind} soft-caps attention logits"),
        (kind not in {"gpt_oss"}, f"{kind} uses attention sinks"),
    ]
    for ok, reason in checks:
        if not ok:
            return False, reason
    return True, "ok"


def packed_logps(
    model: nn.Module, batch: dict[str, Any], *, with_wpo: bool = False, chunk_size: int = 1024,
    with_entropy: bool = False, temperature: float = 1.0,
) -> CompletionLogps:
    """CompletionLogps of a `collate_packed` / `collate_groups` batch: one forward of the packed row, LM head on
    completions only."""
    install_packed_attention(model)
    input_ids = batch["input_ids"]  # (1, T)
    blocks = tuple(tuple(b) for b in batch["attn_blocks"].tolist())  # one host sync per forward
    # A zero-stride 4D placeholder: transformers passes a 4D mask through untouched, so no [T, T] mask is
    # built for the packed row; the blocks define the attention.
    length = input_ids.shape[1]
    placeholder = torch.ones((), dtype=torch.bool, device=input_ids.device).expand(1, 1, length, length)
    vision = dict(batch.get("vision_inputs") or {})
    forward_kwargs = {
        "input_ids": input_ids,
        "position_ids": _positions(model, batch, blocks, vision),
        "attention_mask": placeholder,
        BLOCKS_KWARG: blocks,
    }
    vision.pop("mm_token_type_ids", None)  # only read to build 3-D positions, which are given here
    forward_kwargs.update(vision)  # each image once: its prompt is in the row once
    target_mask = batch["target_mask"]  # (2B, Tc)
    rows, slots = target_mask.nonzero(as_tuple=True)  # row-major: each completion's tokens stay in order
    positions = batch["logit_index"][rows, slots]
    scores = score_positions(
        model, forward_kwargs, torch.zeros_like(positions), positions, batch["target_ids"][rows, slots],
        with_wpo=with_wpo, chunk_size=chunk_size, with_entropy=with_entropy, temperature=temperature,
    )  # fmt: skip
    return gather_scores(scores, rows, slots, *target_mask.shape)  # its mask equals the left-aligned target_mask


def _positions(model: nn.Module, batch: dict[str, Any], blocks: tuple[Block, ...], vision: dict[str, Any]) -> Tensor:
    """The row's position ids: 1-D as collated (restarting per sequence), or, for a model with 3-D multimodal
    positions (Qwen2-VL's M-RoPE), (3, 1, T) built block by block with the model's own `get_rope_index`: a block
    that starts a sequence gets the positions it would have alone, and a block that continues a prefix (shared
    prompt: the rejected answer) continues after the prefix's largest position, as a token after it would."""
    positions = batch["position_ids"]  # (1, T)
    rope_index = getattr(getattr(unwrap_model(model), "model", None), "get_rope_index", None)
    if rope_index is None or "mm_token_type_ids" not in vision:
        return positions
    ids, kinds = batch["input_ids"][0], vision["mm_token_type_ids"][0]  # (T,), (T,)
    grid = vision.get("image_grid_thw")
    out = positions[0].expand(3, -1).clone()  # (3, T)
    image = 0
    for q_start, q_end, p_start, p_end in blocks:
        if p_end > p_start:
            out[:, q_start:q_end] = out[:, p_start:p_end].max() + 1 + torch.arange(q_end - q_start, device=out.device)
            continue
        block_kinds = kinds[q_start:q_end]
        starts = (block_kinds == 1) & torch.cat([block_kinds.new_ones(1), block_kinds[:-1] != 1])
        count = int(starts.sum())
        if count:  # text-only blocks keep their 1-D positions (get_rope_index needs a vision token)
            block, _ = rope_index(input_ids=ids[None, q_start:q_end], mm_token_type_ids=block_kinds[None],
                                  image_grid_thw=grid[image:image + count])  # (3, 1, L)
            out[:, q_start:q_end] = block[:, 0]
            image += count
    return out[:, None]  # (3, 1, T)


register_layout("packed", packed_logps)
