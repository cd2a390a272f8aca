"""A rollout: prompts sampled `num_generations` times with the KV cache (`rollout.generate`), laid out as
prompt + completion rows in the padded layout of `model.logprobs`, scored by the reward functions and/or reward
model (`rollout.rewards`). What an algorithm does with a rollout (advantages, loss) lives in `stages/`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from prefalign.data.prompts import PromptExample, load_prompts, tokenize_prompts
from prefalign.errors import PrefalignError
from prefalign.model.logprobs import completion_logps
from prefalign.model.reference import inference
from prefalign.rollout.generate import generate_completions
from prefalign.rollout.rewards import combine_rewards, compute_rewards, reward_function_name, unscored_counts


@dataclass
class Sampled:
    """A sampled rollout in the padded layout of `model.logprobs` (prompt + completion, right-padded)."""

    batch: dict[str, Tensor]  # input_ids, attention_mask, completion_mask (N, T); layout "padded"
    token_mask: Tensor  # (N, Tc) 1 on real completion tokens (through EOS), left-aligned
    is_truncated: Tensor  # (N,) bool
    prompts: list  # what the reward functions get: the original prompt of each row
    completions: list  # str, or [{"role": "assistant", "content": str}] for conversational prompts
    columns: dict[str, list]


class RolloutSampler:
    """Samples completions for prompts and lays them out for scoring (shared by every on-policy stage)."""

    def __init__(self, cfg: Any, tokenizer: Any, examples: list[PromptExample], prompt_ids: list[list[int]],
                 truncated: int = 0) -> None:
        self.cfg, self.tokenizer, self.examples, self.prompt_ids = cfg, tokenizer, examples, prompt_ids
        self.truncated = truncated  # prompts cut to --max_prompt_length

    def sample(self, model: torch.nn.Module, indices: list[int], num_generations: int, seed: int) -> Sampled:
        cfg = self.cfg
        rollout = generate_completions(
            model, self.tokenizer, [self.prompt_ids[i] for i in indices], num_generations=num_generations,
            max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
            top_k=cfg.top_k, seed=seed,
        )
        rows = [i for i in indices for _ in range(num_generations)]
        batch = padded_layout([self.prompt_ids[i] for i in rows], rollout.completion_ids, rollout.completion_mask,
                              self.tokenizer.pad_token_id)
        examples = [self.examples[i] for i in rows]
        completions = [[{"role": "assistant", "content": t}] if e.is_conversational else t
                       for e, t in zip(examples, rollout.texts)]
        names = sorted({k for e in examples for k in e.columns})
        columns = {k: [e.columns.get(k) for e in examples] for k in names}
        return Sampled(batch, rollout.completion_mask, rollout.is_truncated, [e.prompt for e in examples],
                       completions, columns)


def load_samplers(cfg: Any, tokenizer: Any) -> tuple[RolloutSampler, RolloutSampler | None]:
    """(train, eval) samplers of the prompt data in `cfg`."""
    train, eval_ = load_prompts(cfg)
    samplers = []
    for examples in (train, eval_):
        if not examples:
            samplers.append(None)
            continue
        ids, cut = tokenize_prompts(examples, tokenizer, cfg.max_prompt_length, cfg.truncation_mode)
        samplers.append(RolloutSampler(cfg, tokenizer, examples, ids, cut))
    return samplers[0], samplers[1]


def padded_layout(prompts: list[list[int]], completion_ids: Tensor, completion_mask: Tensor, pad: int) -> dict:
    """Rows prompt + completion (real tokens only), right-padded, with the completion positions marked."""
    lengths = completion_mask.sum(1).tolist()
    width = max(len(p) + n for p, n in zip(prompts, lengths))
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    completion = torch.zeros((len(prompts), width), dtype=torch.long)
    completion_ids = completion_ids.cpu()  # one transfer, not one per row
    for row, (p, n) in enumerate(zip(prompts, lengths)):
        input_ids[row, : len(p)] = torch.tensor(p)
        input_ids[row, len(p) : len(p) + n] = completion_ids[row, :n]
        attention[row, : len(p) + n] = 1
        completion[row, len(p) : len(p) + n] = 1
    return {"layout": "padded", "input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def take_rows(batch: dict[str, Any], rows: Sequence[int]) -> dict[str, Any]:
    """Rows of a padded-layout batch, trimmed to their longest sequence; (N, Tc) tensors to their longest completion."""
    index = torch.tensor(list(rows), dtype=torch.long)
    width = int(batch["attention_mask"][index].sum(1).max())
    tc = int(batch["completion_mask"][index].sum(1).max())
    on_device: dict[torch.device, Tensor] = {}  # the index copied once per device, not once per tensor
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if not isinstance(value, Tensor):
            out[key] = value
            continue
        if value.device not in on_device:
            on_device[value.device] = index.to(value.device)
        idx = on_device[value.device]
        if key in ("input_ids", "attention_mask", "completion_mask"):
            out[key] = value[idx, :width]
        elif value.dim() == 2:
            out[key] = value[idx, :tc]
        else:
            out[key] = value[idx]
    return out


def rollout_logps(model: torch.nn.Module, batch: dict[str, Any], chunk: int, temperature: float,
                  weights: Callable[[], AbstractContextManager[Any]] | None = None) -> Tensor:
    """Per-token log-probs (N, Tc) of a whole rollout, `chunk` rows per forward, without grad.

    `weights` is a context manager factory that selects other weights for the pass (a Reference's `weights`).
    """
    tc = int(batch["completion_mask"].sum(1).max())
    n = batch["input_ids"].size(0)
    out = torch.zeros(n, tc, device=batch["input_ids"].device)
    with inference(model), (weights() if weights else nullcontext()):
        for start in range(0, n, chunk):
            rows = list(range(start, min(start + chunk, n)))
            part = completion_logps(model, take_rows(batch, rows), temperature=temperature).token_logps
            out[start : start + len(rows), : part.size(1)] = part
    return out


def completion_metrics(token_mask: Tensor, is_truncated: Tensor) -> dict[str, float]:
    """TRL's completions/* metrics of a rollout."""
    lengths = token_mask.sum(1).float()  # (N,)
    done = lengths[~is_truncated.bool().to(lengths.device)]
    return {
        "completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": is_truncated.float().mean().item(),
        "completions/mean_terminated_length": done.mean().item() if done.numel() else 0.0,
    }


def score(reward_fns: list, weights: list[float] | None, s: Sampled, when: str = "",
          require_any: bool = False) -> tuple[Tensor, dict[str, float]]:
    """Weighted rewards (N,) of a rollout and the per-function metrics; errors name `when` ("at step 3 ...").
    With `require_any`, a rollout that no reward function scores at all (every value None) is an error: its
    advantages would all be 0 and the step would train on nothing."""
    per_function = compute_rewards(reward_fns, s.prompts, s.completions, s.columns, when)  # (F, N)
    names = [reward_function_name(f) for f in reward_fns]
    if require_any and per_function.numel() and bool(torch.isnan(per_function).all()):
        n = per_function.size(1)
        raise PrefalignError(f"no reward function scored any of the {n} completions ({unscored_counts(per_function, names)}); "
                             "check that the functions apply to this data (e.g. its 'answer' column)",
                             f"rewards {when}".strip())
    return combine_rewards(per_function, weights, names)
