"""A rollout: prompts sampled `num_generations` times, each prompt prefilled once (`rollout.generate`), kept as
completion groups (`CompletionGroups`) that lay themselves out for a forward, and scored by the reward functions
and/or reward model (`rollout.rewards`). What an algorithm does with a rollout (advantages, loss) lives in `stages/`.

`CompletionGroups` is the piece other on-policy algorithms build on: G completions per prompt, rows grouped by
prompt, and for any rows either the shared-prompt packed layout (`data.packing.collate_groups`: each group's prompt
once, every completion attending to it and to itself) or padded prompt + completion rows; `completion_logps` reads
both (`model.logprobs`, `model.packed`), and the two give the same log-probs (tests/model/test_packed.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from prefalign.data.packing import CompletionGroup, collate_groups
from prefalign.data.prompts import PromptExample, load_prompts, tokenize_prompts
from prefalign.errors import PrefalignError
from prefalign.model.logprobs import completion_logps
from prefalign.model.reference import inference
from prefalign.rollout.generate import generate_completions
from prefalign.rollout.rewards import combine_rewards, compute_rewards, reward_function_name, unscored_counts


@dataclass
class CompletionGroups:
    """G completions of each prompt; row r continues prompt r // G. The model-side view of a rollout."""

    prompt_ids: list[list[int]]  # one per group
    num_generations: int
    completion_ids: Tensor  # (N, Tc) right-padded with pad_token_id
    completion_mask: Tensor  # (N, Tc) 1 on real completion tokens (through EOS), left-aligned
    pad_token_id: int

    def __len__(self) -> int:
        return self.completion_ids.size(0)

    def prompt_of(self, row: int) -> list[int]:
        return self.prompt_ids[row // self.num_generations]

    def completion(self, row: int) -> list[int]:
        return self.completion_ids[row, : int(self.lengths[row])].tolist()

    @property
    def lengths(self) -> Tensor:
        return self.completion_mask.sum(1)  # (N,)

    def batch(self, rows: Sequence[int], packed: bool) -> dict[str, Any]:
        """Model input of `rows` (result rows in that order): the shared-prompt packed row, or padded prompt +
        completion rows.

        Packed, the rows of one prompt form one group wherever they stand in `rows` (its prompt appears once), e.g.
        online DPO's chosen rows then rejected rows. `num_tokens` counts each row's prompt + completion (TRL's
        num_tokens), whatever the layout.
        """
        rows = list(rows)
        lengths = self.lengths[rows].tolist()
        completions = [ids[:n] for ids, n in zip(self.completion_ids[rows].tolist(), lengths)]  # one transfer
        if packed:
            groups, order = self._groups_of(rows, completions)
            batch = collate_groups(groups, self.pad_token_id, row_order=order)
        else:
            index = torch.tensor(rows, dtype=torch.long, device=self.completion_ids.device)
            batch = padded_layout([self.prompt_of(r) for r in rows], self.completion_ids[index],
                                  self.completion_mask[index], self.pad_token_id)
        batch["num_tokens"] = sum(len(self.prompt_of(r)) + n for r, n in zip(rows, lengths))
        return batch

    def _groups_of(self, rows: list[int], completions: list[list[int]]) -> tuple[list[CompletionGroup],
                                                                                    list[int] | None]:
        """`rows` as completion groups (one per prompt, in order of first appearance) and the row order that
        `collate_groups` needs to give the results in the order of `rows` (None when it is the group order)."""
        members: dict[int, list[int]] = {}  # group -> positions in `rows`
        for k, r in enumerate(rows):
            members.setdefault(r // self.num_generations, []).append(k)
        groups = [CompletionGroup(self.prompt_ids[g], tuple(completions[k] for k in ks)) for g, ks in members.items()]
        built = [k for ks in members.values() for k in ks]  # position in `rows` of each completion as built
        if built == list(range(len(rows))):
            return groups, None
        slot = {k: b for b, k in enumerate(built)}
        return groups, [slot[k] for k in range(len(rows))]

    def logps(self, model: torch.nn.Module, chunk: int, temperature: float, packed: bool,
              weights: Callable[[], AbstractContextManager[Any]] | None = None) -> Tensor:
        """Per-token log-probs (N, Tc) of every row, `chunk` rows per forward, without grad.

        `weights` is a context manager factory that selects other weights for the pass (a Reference's `weights`).
        """
        n, tc = len(self), int(self.lengths.max()) if len(self) else 0
        out = torch.zeros(n, tc, device=self.completion_ids.device)
        with inference(model), (weights() if weights else nullcontext()):
            for start in range(0, n, chunk):
                rows = range(start, min(start + chunk, n))
                batch = {k: v.to(out.device) if isinstance(v, Tensor) else v
                         for k, v in self.batch(rows, packed).items()}
                part = completion_logps(model, batch, temperature=temperature).token_logps
                out[start : start + len(rows), : part.size(1)] = part
        return out


@dataclass
class Sampled:
    """A sampled share of a rollout: its completion groups, and what the reward functions see."""

    groups: CompletionGroups
    is_truncated: Tensor  # (N,) bool: no EOS within max_completion_length
    prompts: list  # what the reward functions get: the original prompt of each row
    completions: list  # str, or [{"role": "assistant", "content": str}] for conversational prompts
    columns: dict[str, list]

    @property
    def token_mask(self) -> Tensor:
        return self.groups.completion_mask


class RolloutSampler:
    """Samples completions for prompts (shared by every on-policy stage)."""

    def __init__(self, cfg: Any, tokenizer: Any, examples: list[PromptExample], prompt_ids: list[list[int]],
                 truncated: int = 0) -> None:
        self.cfg, self.tokenizer, self.examples, self.prompt_ids = cfg, tokenizer, examples, prompt_ids
        self.truncated = truncated  # prompts cut to --max_prompt_length

    def sample(self, model: torch.nn.Module, indices: list[int], num_generations: int, seed: int, *,
               first_row: int = 0, total_rows: int | None = None,
               all_done: Callable[[Tensor], bool] | None = None) -> Sampled:
        """`num_generations` completions of each prompt in `indices`; these may be a share (rows `first_row` ..)
        of a rollout of `total_rows` rows, sampled as they would be with the whole rollout (`RowNoise`)."""
        cfg = self.cfg
        prompts = [self.prompt_ids[i] for i in indices]
        rollout = generate_completions(
            model, self.tokenizer, prompts, num_generations=num_generations,
            max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
            top_k=cfg.top_k, seed=seed, first_row=first_row, total_rows=total_rows, all_done=all_done,
        )
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        groups = CompletionGroups(prompts, num_generations, rollout.completion_ids, rollout.completion_mask, pad)
        examples = [self.examples[i] for i in indices for _ in range(num_generations)]
        completions = [[{"role": "assistant", "content": t}] if e.is_conversational else t
                       for e, t in zip(examples, rollout.texts)]
        names = sorted({k for e in examples for k in e.columns})
        columns = {k: [e.columns.get(k) for e in examples] for k in names}
        return Sampled(groups, rollout.is_truncated, [e.prompt for e in examples], completions, columns)


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
        input_ids[row, : len(p)] = torch.tensor(p, dtype=torch.long)
        input_ids[row, len(p) : len(p) + n] = completion_ids[row, :n]
        attention[row, : len(p) + n] = 1
        completion[row, len(p) : len(p) + n] = 1
    return {"layout": "padded", "input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def take_rows(tensors: dict[str, Tensor], rows: Sequence[int]) -> dict[str, Tensor]:
    """Rows of per-row tensors; (N, Tc) ones trimmed to the longest completion among the rows, which `token_mask`
    (N, Tc) marks."""
    index = torch.tensor(list(rows), dtype=torch.long)
    tc = int(tensors["token_mask"][index].sum(1).max())
    on_device: dict[torch.device, Tensor] = {}  # the index copied once per device, not once per tensor
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if value.device not in on_device:
            on_device[value.device] = index.to(value.device)
        picked = value[on_device[value.device]]
        out[key] = picked[:, :tc] if value.dim() == 2 else picked
    return out


def completion_metrics(token_mask: Tensor, is_truncated: Tensor) -> dict[str, float]:
    """TRL's completions/* metrics of a rollout (the terminated ones are 0 when no completion terminated)."""
    lengths = token_mask.sum(1).float()  # (N,)
    done = lengths[~is_truncated.bool().to(lengths.device)]
    if done.numel() == 0:
        done = torch.zeros(1)
    return {
        "completions/mean_length": lengths.mean().item(), "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": is_truncated.float().mean().item(),
        "completions/mean_terminated_length": done.mean().item(),
        "completions/min_terminated_length": done.min().item(),
        "completions/max_terminated_length": done.max().item(),
    }


def reward_columns(reward_fns: list, s: Sampled, when: str = "") -> Tensor:
    """Each reward function's values (F, N) for the sampled rows (nan where it returned None); errors name `when`."""
    return compute_rewards(reward_fns, s.prompts, s.completions, s.columns, when)


def reward_names(reward_fns: list) -> list[str]:
    return [reward_function_name(f) for f in reward_fns]


def score(reward_fns: list, weights: list[float] | None, per_function: Tensor, when: str = "",
          require_any: bool = False) -> tuple[Tensor, dict[str, float]]:
    """Weighted rewards (N,) of a rollout's reward table (F, N) (every process's rows, `reward_columns`) and the
    per-function metrics. With `require_any`, a rollout that no reward function scores at all (every value None)
    is an error naming `when` ("at step 3 ..."): its advantages would all be 0 and the step would train on nothing."""
    names = reward_names(reward_fns)
    if require_any and per_function.numel() and bool(torch.isnan(per_function).all()):
        n = per_function.size(1)
        raise PrefalignError(f"no reward function scored any of the {n} completions ({unscored_counts(per_function, names)}); "
                             "check that the functions apply to this data (e.g. its 'answer' column)",
                             f"rewards {when}".strip())
    return combine_rewards(per_function, weights, names)
