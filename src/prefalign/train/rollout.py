"""The rollout machinery GRPO, RLOO and PPO share: sampling, scheduling, layout, scoring and set-up.

A rollout is a batch of prompts, each sampled `num_generations` times with the KV cache (`rollout.generate`),
laid out as prompt + completion rows in the padded layout of `model.logprobs`, and scored by the reward
functions and/or reward model (`rollout.rewards`). `RolloutSchedule` decides which prompts each rollout of an
epoch samples (a (seed, epoch) shuffle), which rows each micro-batch of the loop takes, and keeps the current
rollout. Rollouts are seeded by (seed, epoch, rollout), so a run is reproducible and a resumed run samples what
the uninterrupted one would have (a resume in the middle of a rollout's optimizer steps resamples it from the
resumed weights). What a stage does with a rollout (advantages, loss) lives in `train.grpo` and `train.ppo`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prefalign.data.prompts import PromptExample
from prefalign.errors import PrefalignError
from prefalign.model.logprobs import completion_logps
from prefalign.rollout.generate import generate_completions, mask_truncated_completions
from prefalign.rollout.rewards import combine_rewards, compute_rewards, reward_function_name
from prefalign.train.loop import sequential_groups
from prefalign.train.metrics import MetricSums

# ----------------------------------------------------------------------------------------------- configuration


@dataclass
class GenerationArgs:
    num_generations: int = 8
    """Completions sampled per prompt: the group whose rewards are compared."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int | None = None
    """Keep only the k most likely tokens when sampling (default: no limit)."""
    mask_truncated_completions: bool = False
    """Completions that hit --max_completion_length without EOS add no loss (DAPO)."""
    use_vllm: bool = False
    """Generate with vLLM (GPU only; needs the vllm package)."""
    disable_dropout: bool = True
    """Switch dropout off in the policy, so that rollouts and updates see the same function."""


@dataclass
class RewardArgs:
    reward_funcs: list[str] = field(default_factory=list)
    """Reward functions: exact_match, exact_match:number, regex:PATTERN, length:N, module:function or
    file.py:function (called as fn(prompts=..., completions=..., **dataset_columns) -> list[float | None])."""
    reward_weights: list[float] | None = None
    """Weight of each reward (functions first, then the reward model); default 1 each."""
    reward_model_name_or_path: str | None = None
    """A sequence-classification reward model (e.g. from `prefalign rm`) scoring prompt + completion."""


def check_rl_config(cfg: Any, needs_rewards: bool = True) -> None:
    """What GRPO, RLOO and PPO can check before loading anything."""
    from prefalign.train.run import check_train_args, require

    require(cfg, "model_name_or_path", "dataset_name")
    if not cfg.max_completion_length or cfg.max_completion_length < 1:
        raise PrefalignError("must be a positive number of tokens", "--max_completion_length")
    if cfg.temperature <= 0:
        raise PrefalignError(f"must be > 0 for sampling, got {cfg.temperature}", "--temperature")
    if not 0 < cfg.top_p <= 1:
        raise PrefalignError(f"must be in (0, 1], got {cfg.top_p}", "--top_p")
    if cfg.use_vllm:
        check_vllm()
    if needs_rewards and not cfg.reward_funcs and not cfg.reward_model_name_or_path:
        raise PrefalignError("give --reward_funcs and/or --reward_model_name_or_path", "--reward_funcs")
    check_train_args(cfg)


def check_vllm() -> None:
    if not torch.cuda.is_available():
        raise PrefalignError("vLLM generation needs a CUDA GPU and none is available; drop --use_vllm", "--use_vllm")
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise PrefalignError("vLLM is not installed (pip install vllm); or drop --use_vllm", "--use_vllm") from None
    raise PrefalignError("the vLLM backend is not part of this version yet; drop --use_vllm", "--use_vllm")


# ----------------------------------------------------------------------------------------------- rollouts


@dataclass(frozen=True)
class RolloutSlice(Sequence[int]):
    """One micro-batch as the loop sees it: rows of rollout `rollout` of `epoch` (len() = completions)."""

    epoch: int
    rollout: int
    rows: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: Any) -> Any:
        return self.rows[i]


def plan_rollouts(num_prompts: int, prompts_per_rollout: int, seed: int, epoch: int) -> list[list[int]]:
    """Prompt indices of each rollout of an epoch: a (seed, epoch) shuffle, the last rollout filled up cyclically."""
    order = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    count = math.ceil(num_prompts / prompts_per_rollout)
    order = (order * math.ceil(count * prompts_per_rollout / num_prompts))[: count * prompts_per_rollout]
    return [order[i : i + prompts_per_rollout] for i in range(0, len(order), prompts_per_rollout)]


def rollout_seed(seed: int, epoch: int, rollout: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + rollout) % (2**63)


class RolloutSchedule:
    """Which prompts each rollout samples, which rows each micro-batch takes, and the rollout in use.

    `micro_batches(epoch, r)` lists the row tuples of rollout r's micro-batches in loop order (all its optimizer
    steps); `build(epoch, r)` samples and scores rollout r. Only the current rollout is kept.
    """

    def __init__(self, num_prompts: int, prompts_per_rollout: int, seed: int,
                 micro_batches: Callable[[int, int], list[tuple[int, ...]]],
                 build: Callable[[int, int], dict[str, Any]]) -> None:
        self.num_prompts, self.prompts_per_rollout, self.seed = num_prompts, prompts_per_rollout, seed
        self.micro_batches, self.build = micro_batches, build
        self._plan: tuple[int, list[list[int]]] | None = None
        self._current: tuple[tuple[int, int], dict[str, Any]] | None = None

    def plan(self, epoch: int) -> list[list[int]]:
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, plan_rollouts(self.num_prompts, self.prompts_per_rollout, self.seed, epoch))
        return self._plan[1]

    def groups(self, epoch: int) -> list[RolloutSlice]:
        """Every micro-batch of the epoch in loop order (the loop asks once per epoch)."""
        return [RolloutSlice(epoch, r, rows) for r in range(len(self.plan(epoch))) for rows in self.micro_batches(epoch, r)]

    def get(self, ref: RolloutSlice) -> dict[str, Any]:
        """The rollout `ref` belongs to, sampled and scored on first use."""
        key = (ref.epoch, ref.rollout)
        if self._current is None or self._current[0] != key:
            self._current = (key, self.build(*key))
        return self._current[1]

    def weight(self, ref: RolloutSlice, per_token: bool) -> float:
        """Completions of the micro-batch, or its real loss tokens (1 each when the whole rollout has none)."""
        rollout = self.get(ref)
        if not per_token:
            return float(len(ref))
        if rollout["total_tokens"] == 0:  # every completion masked: the loss is 0, any positive weight will do
            return 1.0
        return float(rollout["loss_mask"][list(ref.rows)].sum())

    def micro_batch(self, ref: RolloutSlice) -> dict[str, Any]:
        rollout = self.get(ref)
        batch = take_rows(rollout["tensors"], ref.rows)
        batch["num_tokens"] = int(batch["attention_mask"].sum())
        batch["rollout_metrics"] = rollout["metrics"]
        return batch


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
    """Samples completions for prompts and lays them out for scoring (shared by GRPO, RLOO and PPO)."""

    def __init__(self, cfg: Any, tokenizer: Any, examples: list[PromptExample], prompt_ids: list[list[int]]) -> None:
        self.cfg, self.tokenizer, self.examples, self.prompt_ids = cfg, tokenizer, examples, prompt_ids

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


@contextmanager
def inference(model: torch.nn.Module) -> Iterator[None]:
    """No grad and eval mode for a pass; every module's own train flag is restored afterwards."""
    from prefalign.model.reference import eval_mode

    with torch.no_grad(), eval_mode(model):
        yield


def rollout_logps(model: torch.nn.Module, batch: dict[str, Any], chunk: int, temperature: float,
                  weights: Any = None) -> Tensor:
    """Per-token log-probs (N, Tc) of a whole rollout, `chunk` rows per forward, without grad.

    `weights` is a context manager factory that selects other weights for the pass (the reference adapter).
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


def reference_weights(reference: Any) -> tuple[torch.nn.Module, Any]:
    """(model, weights context) of a `model.reference.Reference`, so log-probs can be taken at a temperature."""
    return reference.model, reference.weights


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


def score(reward_fns: list, weights: list[float] | None, s: Sampled) -> tuple[Tensor, dict[str, float]]:
    """Weighted rewards (N,) of a rollout and the per-function metrics."""
    per_function = compute_rewards(reward_fns, s.prompts, s.completions, s.columns)  # (F, N)
    return combine_rewards(per_function, weights, [reward_function_name(f) for f in reward_fns])


def eval_groups(sampler: RolloutSampler | None, size: int) -> list[list[int]]:
    return sequential_groups(len(sampler.examples) if sampler else 0, size)


class RolloutStage:
    """What GRPO/RLOO and PPO share as loop stages (see train.loop.Stage): micro-batches are slices of rollouts
    from `self.schedule`, evaluation batches are prompt indices, and a rollout starts by sampling and scoring.
    Subclasses set cfg, samplers ({"train", "eval"}), schedule, reward_fns and per_token."""

    example_unit = "completions"
    per_token = True  # micro-batches weigh their real loss tokens (False: their completions)
    cfg: Any
    samplers: dict[str, RolloutSampler | None]
    schedule: RolloutSchedule
    reward_fns: list

    def train_groups(self, epoch: int) -> list[RolloutSlice]:
        return self.schedule.groups(epoch)

    def eval_groups(self) -> list[list[int]]:
        return eval_groups(self.samplers["eval"], self.cfg.per_device_eval_batch_size)

    def batch_weight(self, group: Any, split: str) -> float:
        return self.schedule.weight(group, self.per_token) if split == "train" else float(len(group))

    def make_batch(self, group: Any, split: str) -> dict[str, Any]:
        return self.schedule.micro_batch(group) if split == "train" else {"indices": list(group)}

    def sample_rollout(self, model: torch.nn.Module, epoch: int, r: int,
                       num_generations: int) -> tuple[Sampled, dict[str, Any], Tensor, dict[str, float], Tensor]:
        """Rollout r of the epoch: (sampled, its batch on the device, rewards, reward metrics, loss mask)."""
        cfg = self.cfg
        s = self.samplers["train"].sample(model, self.schedule.plan(epoch)[r], num_generations,  # type: ignore[union-attr]
                                          rollout_seed(cfg.seed, epoch, r))
        batch = {k: v.to(s.token_mask.device) if isinstance(v, Tensor) else v for k, v in s.batch.items()}
        rewards, metrics = score(self.reward_fns, cfg.reward_weights, s)
        loss_mask = s.token_mask
        if cfg.mask_truncated_completions:
            loss_mask = mask_truncated_completions(loss_mask, s.is_truncated)
        return s, batch, rewards, metrics, loss_mask

    @staticmethod
    def finish_rollout(s: Sampled, tensors: dict[str, Any], loss_mask: Tensor,
                       metrics: dict[str, float]) -> dict[str, Any]:
        """What the schedule keeps of a rollout: its tensors, loss mask (on the host), token count and metrics."""
        metrics.update(completion_metrics(s.token_mask, s.is_truncated))
        loss_mask_host = loss_mask.cpu()
        return {"tensors": tensors, "loss_mask": loss_mask_host, "total_tokens": int(loss_mask_host.sum()),
                "metrics": metrics}


def eval_rewards(sampler: Any, model: torch.nn.Module, indices: list[int], reward_fns: list, cfg: Any,
                 reward_name: str = "reward") -> MetricSums:
    """One sampled completion per held-out prompt, scored by the training rewards."""
    s = sampler.sample(model, indices, 1, rollout_seed(cfg.seed, -1, indices[0]))
    rewards, per_fn = score(reward_fns, cfg.reward_weights, s)
    n = float(len(indices))
    out: MetricSums = {reward_name: (float(torch.nansum(rewards)), float((~torch.isnan(rewards)).sum()))}
    out.update({k: (v * n, n) for k, v in per_fn.items() if k.endswith("/mean")})
    out["completions/mean_length"] = (float(s.token_mask.sum()), n)
    return out


# ----------------------------------------------------------------------------------------------- set-up


def load_rl_data(cfg: Any, tokenizer: Any, accelerator: Any) -> tuple[RolloutSampler, RolloutSampler | None]:
    from prefalign.data.prompts import load_prompts, tokenize_prompts

    train, eval_ = load_prompts(cfg)
    samplers = []
    for name, examples in (("train", train), ("eval", eval_)):
        if not examples:
            samplers.append(None)
            continue
        ids, cut = tokenize_prompts(examples, tokenizer, cfg.max_prompt_length, cfg.truncation_mode)
        accelerator.print(f"{name}: {len(ids)} prompts, {cut} cut to max_prompt_length")
        samplers.append(RolloutSampler(cfg, tokenizer, examples, ids))
    return samplers[0], samplers[1]


def load_reward_functions(cfg: Any, device: Any) -> list:
    from prefalign.rollout.rewards import RewardModelScorer, load_reward_function

    fns = [load_reward_function(spec) for spec in cfg.reward_funcs]
    if cfg.reward_model_name_or_path:
        if not Path(cfg.reward_model_name_or_path).is_dir():
            raise PrefalignError("no such reward model directory", f"--reward_model_name_or_path {cfg.reward_model_name_or_path}")
        fns.append(RewardModelScorer(cfg.reward_model_name_or_path, batch_size=cfg.per_device_train_batch_size,
                                     device=device))
    if cfg.reward_weights is not None and len(cfg.reward_weights) != len(fns):
        raise PrefalignError(f"{len(cfg.reward_weights)} weights given for {len(fns)} rewards", "--reward_weights")
    return fns
