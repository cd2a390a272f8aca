"""GRPO (`prefalign grpo`) on the shared loop, and the rollout machinery RLOO and PPO reuse.

One optimizer step = one rollout: B x A x processes completions (`--per_device_train_batch_size` counts
completions, as in TRL), i.e. that many / `--num_generations` prompts, each sampled G times with the KV cache.
The rollout is scored by the reward functions, turned into group advantages, and kept for `--num_iterations`
optimizer steps; its old-policy log-probs are computed once when they are needed (num_iterations > 1, or RLOO's
KL-in-reward), the reference's once when `--beta` != 0. Rollouts are seeded by (seed, epoch, rollout), so a run
is reproducible and a resumed run samples what the uninterrupted one would have (a resume in the middle of a
rollout's iterations resamples it from the resumed weights).

Loss normalisation. The loop divides the summed micro-batch losses by the summed `batch_weight` of the step, so
`step` returns sums and batch B x A equals A·B x 1 for every loss type:
- grpo:     sum over completions of (token mean of the completion) / completions in the step (TRL's value).
- dr_grpo:  sum over tokens / max_completion_length / completions in the step (TRL's value).
- dapo:     sum over tokens / real tokens in the step (TRL's value: num_items_in_batch).
- bnpo:     the same token mean over the whole step. TRL takes the token mean of each micro-batch and averages
            those, which depends on how the step is split; the two agree at gradient_accumulation_steps=1 on one
            process, and bnpo equals dapo here.
Log-probs are those of the temperature-scaled logits (TRL's choice), so the policy optimised is the sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prefalign.config import DataArgs, ModelArgs, TrainArgs
from prefalign.data.prompts import PromptExample
from prefalign.errors import PrefalignError
from prefalign.losses.policy import GRPO_NORMALIZERS, SCALE_REWARDS, group_advantages, grpo_loss
from prefalign.model.logprobs import completion_logps
from prefalign.rollout.generate import generate_completions, mask_truncated_completions
from prefalign.rollout.rewards import combine_rewards, compute_rewards, reward_function_name
from prefalign.train.metrics import MetricSums
from prefalign.train.run import disable_dropout, print_summary

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


@dataclass
class GRPOArgs:
    beta: float = 0.0
    """Weight of the per-token k3 KL to the reference in the loss; 0 loads no reference."""
    loss_type: str = "dapo"
    """How per-token losses are averaged: grpo (per completion, then over completions), bnpo, dr_grpo
    (divide by max_completion_length) or dapo (over every token of the step)."""
    scale_rewards: str = "group"
    """Divide advantages by the std of the group, of the whole batch, or none (Dr. GRPO)."""
    epsilon: float = 0.2
    """Lower clipping bound of the importance ratio: 1 - epsilon."""
    epsilon_high: float | None = None
    """Upper clipping bound 1 + epsilon_high (DAPO's clip-higher; default: epsilon)."""
    delta: float | None = None
    """Also cap the ratio at delta in the unclipped term (two-sided clipping); must be > 1 + epsilon_high."""
    importance_sampling_level: str = "token"
    """Importance ratio per token, or per sequence from the mean token log-ratio (GSPO)."""
    num_iterations: int = 1
    """Optimizer steps on each rollout (μ of the GRPO paper); > 1 computes old-policy log-probs."""
    top_entropy_quantile: float = 1.0
    """Train only on the completion tokens in this top fraction of entropy (0.2 = the "80/20" paper)."""


@dataclass
class GRPOConfig(GRPOArgs, RewardArgs, GenerationArgs, TrainArgs, DataArgs, ModelArgs):
    """Configuration of `prefalign grpo`."""

    learning_rate: float = 1e-6
    """Peak learning rate of AdamW (TRL's GRPO default)."""
    per_device_train_batch_size: int = 8
    """Completions (prompts x generations) per micro-batch on each device."""
    per_device_eval_batch_size: int = 8
    """Prompts per evaluation batch (one sampled completion each)."""
    max_prompt_length: int | None = 512
    """Longest prompt in tokens; longer prompts are cut per --truncation_mode."""
    max_completion_length: int | None = 256
    """Most tokens sampled per completion."""


def check_rl_config(cfg: Any, needs_rewards: bool = True) -> None:
    """What GRPO, RLOO and PPO can check before loading anything."""
    from prefalign.train.run import check_train_args

    for flag in ("model_name_or_path", "dataset_name"):
        if not getattr(cfg, flag):
            raise PrefalignError("is required", f"--{flag}")
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


def check_grpo_config(cfg: GRPOConfig) -> None:
    check_rl_config(cfg)
    g, per_step = cfg.num_generations, cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    if g < 2:
        raise PrefalignError(f"must be at least 2 (advantages compare completions of a prompt), got {g}",
                             "--num_generations")
    if per_step % g:
        raise PrefalignError(f"per_device_train_batch_size x gradient_accumulation_steps = {per_step} completions "
                             f"per step must be a multiple of num_generations = {g}", "--num_generations")
    choices = {"loss_type": GRPO_NORMALIZERS, "scale_rewards": SCALE_REWARDS,
               "importance_sampling_level": ("token", "sequence")}
    for flag, allowed in choices.items():
        if getattr(cfg, flag) not in allowed:
            raise PrefalignError(f"must be one of {', '.join(allowed)}, got {getattr(cfg, flag)!r}", f"--{flag}")
    if cfg.num_iterations < 1:
        raise PrefalignError(f"must be at least 1, got {cfg.num_iterations}", "--num_iterations")
    if not 0 < cfg.top_entropy_quantile <= 1:
        raise PrefalignError(f"must be in (0, 1], got {cfg.top_entropy_quantile}", "--top_entropy_quantile")
    high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    if cfg.delta is not None and cfg.delta <= 1 + high:
        raise PrefalignError(f"must be > 1 + epsilon_high = {1 + high}, got {cfg.delta}", "--delta")


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
        self._groups: tuple[int, list[RolloutSlice]] | None = None
        self._current: tuple[tuple[int, int], dict[str, Any]] | None = None

    def plan(self, epoch: int) -> list[list[int]]:
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, plan_rollouts(self.num_prompts, self.prompts_per_rollout, self.seed, epoch))
        return self._plan[1]

    def groups(self, epoch: int) -> list[RolloutSlice]:
        if self._groups is None or self._groups[0] != epoch:
            groups = [RolloutSlice(epoch, r, rows) for r in range(len(self.plan(epoch)))
                      for rows in self.micro_batches(epoch, r)]
            self._groups = (epoch, groups)
        return self._groups[1]

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
    for row, (p, n) in enumerate(zip(prompts, lengths)):
        input_ids[row, : len(p)] = torch.tensor(p)
        input_ids[row, len(p) : len(p) + n] = completion_ids[row, :n].cpu()
        attention[row, : len(p) + n] = 1
        completion[row, len(p) : len(p) + n] = 1
    return {"layout": "padded", "input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def take_rows(batch: dict[str, Any], rows: Sequence[int]) -> dict[str, Any]:
    """Rows of a padded-layout batch, trimmed to their longest sequence; (N, Tc) tensors to their longest completion."""
    index = torch.tensor(list(rows), dtype=torch.long)
    width = int(batch["attention_mask"][index].sum(1).max())
    tc = int(batch["completion_mask"][index].sum(1).max())
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if not isinstance(value, Tensor):
            out[key] = value
        elif key in ("input_ids", "attention_mask", "completion_mask"):
            out[key] = value[index.to(value.device), :width]
        elif value.dim() == 2:
            out[key] = value[index.to(value.device), :tc]
        else:
            out[key] = value[index.to(value.device)]
    return out


@contextmanager
def inference(model: torch.nn.Module) -> Iterator[None]:
    """No grad and eval mode for a pass; every module's own train flag is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def rollout_logps(model: torch.nn.Module, batch: dict[str, Any], chunk: int, temperature: float,
                  weights: Any = None) -> Tensor:
    """Per-token log-probs (N, Tc) of a whole rollout, `chunk` rows per forward, without grad.

    `weights` is a context manager factory that selects other weights for the pass (the reference adapter).
    """
    tc = int(batch["completion_mask"].sum(1).max())
    n = batch["input_ids"].size(0)
    out = torch.zeros(n, tc, device=batch["input_ids"].device)
    with inference(model), (weights() if weights else _nothing()):
        for start in range(0, n, chunk):
            rows = list(range(start, min(start + chunk, n)))
            part = completion_logps(model, take_rows(batch, rows), temperature=temperature).token_logps
            out[start : start + len(rows), : part.size(1)] = part
    return out


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def reference_weights(reference: Any) -> tuple[torch.nn.Module, Any]:
    """(model, weights context) of a `model.reference.Reference`, so log-probs can be taken at a temperature."""
    return reference.model, reference._weights


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


# ----------------------------------------------------------------------------------------------- the stage

AdvantageFn = Callable[[Tensor, Tensor | None, Tensor | None, Tensor], tuple[Tensor, dict[str, float]]]


def grpo_advantages(cfg: GRPOConfig) -> AdvantageFn:
    def advantages(rewards: Tensor, sampling_logps: Tensor | None, ref_logps: Tensor | None,
                   mask: Tensor) -> tuple[Tensor, dict[str, float]]:
        adv, metrics = group_advantages(rewards, cfg.num_generations, scale_rewards=cfg.scale_rewards)
        return adv, {k: float(v) for k, v in metrics.items()}

    return advantages


class GRPOStage:
    """Group-relative policy optimisation for the loop (see train.loop.Stage); RLOO passes its own advantages."""

    example_unit = "completions"
    progress_keys = {"reward": "reward", "kl": "kl", "completions/mean_length": "len"}

    def __init__(self, cfg: GRPOConfig, model: torch.nn.Module, train: RolloutSampler, eval_: RolloutSampler | None,
                 reward_fns: list, reference: Any, num_processes: int = 1, advantage_fn: AdvantageFn | None = None,
                 kl_in_reward: bool = False) -> None:
        self.cfg, self.model, self.reward_fns, self.reference = cfg, model, reward_fns, reference
        self.samplers = {"train": train, "eval": eval_}
        self.advantage_fn = advantage_fn or grpo_advantages(cfg)
        self.kl_in_reward = kl_in_reward  # RLOO: beta·KL is subtracted from the reward, not added to the loss
        self.rows_per_rollout = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * num_processes
        self.per_token = cfg.loss_type in ("dapo", "bnpo")
        self.schedule = RolloutSchedule(len(train.examples), self.rows_per_rollout // cfg.num_generations, cfg.seed,
                                        self._micro_batches, self._sample_and_score)

    # ---------------------------------------------------------------- data
    def _micro_batches(self, epoch: int, r: int) -> list[tuple[int, ...]]:
        b = self.cfg.per_device_train_batch_size
        one_pass = [tuple(range(k, k + b)) for k in range(0, self.rows_per_rollout, b)]
        return one_pass * self.cfg.num_iterations

    def train_groups(self, epoch: int) -> list[RolloutSlice]:
        return self.schedule.groups(epoch)

    def eval_groups(self) -> list[list[int]]:
        return eval_groups(self.samplers["eval"], self.cfg.per_device_eval_batch_size)

    def batch_weight(self, group: Sequence[int], split: str) -> float:
        return self.schedule.weight(group, self.per_token) if split == "train" else float(len(group))  # type: ignore[arg-type]

    def make_batch(self, group: Sequence[int], split: str) -> dict[str, Any]:
        return self.schedule.micro_batch(group) if split == "train" else {"indices": list(group)}  # type: ignore[arg-type]

    # ---------------------------------------------------------------- rollouts
    def _sample_and_score(self, epoch: int, r: int) -> dict[str, Any]:
        cfg = self.cfg
        s = self.samplers["train"].sample(self.model, self.schedule.plan(epoch)[r], cfg.num_generations,
                                          rollout_seed(cfg.seed, epoch, r))
        device = s.token_mask.device
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in s.batch.items()}
        rewards, metrics = score(self.reward_fns, cfg.reward_weights, s)
        loss_mask = s.token_mask
        if cfg.mask_truncated_completions:
            loss_mask = mask_truncated_completions(loss_mask, s.is_truncated)
        chunk = cfg.per_device_train_batch_size
        sampling = None
        if cfg.num_iterations > 1 or (self.kl_in_reward and cfg.beta != 0):
            sampling = rollout_logps(self.model, batch, chunk, cfg.temperature)
        ref = None
        if cfg.beta != 0:
            model, weights = reference_weights(self.reference)
            ref = rollout_logps(model, batch, chunk, cfg.temperature, weights)
        advantages, adv_metrics = self.advantage_fn(rewards.to(device), sampling, ref, s.token_mask)
        tensors = {**batch, "loss_mask": loss_mask, "advantages": advantages}
        if sampling is not None and cfg.num_iterations > 1:
            tensors["old_logps"] = sampling
        if ref is not None and not self.kl_in_reward:
            tensors["ref_logps"] = ref
        metrics.update(adv_metrics)
        metrics.update(completion_metrics(s.token_mask, s.is_truncated))
        return {"tensors": tensors, "loss_mask": loss_mask.cpu(), "total_tokens": int(loss_mask.sum()),
                "metrics": metrics}

    # ---------------------------------------------------------------- math
    def step(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[Tensor, MetricSums]:
        cfg = self.cfg
        out = completion_logps(model, batch, with_entropy=True, temperature=cfg.temperature)
        mask = batch["loss_mask"]  # (b, Tc)
        loss, m = grpo_loss(
            out.token_logps, batch["advantages"], mask, old_per_token_logps=batch.get("old_logps"),
            ref_per_token_logps=batch.get("ref_logps"), entropies=out.entropy,
            loss_type="bnpo" if self.per_token else cfg.loss_type, beta=0.0 if self.kl_in_reward else cfg.beta,
            epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, delta=cfg.delta,
            importance_sampling_level=cfg.importance_sampling_level, top_entropy_quantile=cfg.top_entropy_quantile,
            max_completion_length=cfg.max_completion_length,
        )
        tokens = float(mask.sum())
        weight = tokens if self.per_token else float(mask.size(0))
        loss_sum = loss * weight  # undo the micro-batch normalisation: the loop divides by the step's weight
        metrics: MetricSums = {"loss": (float(loss_sum.detach()), weight)}
        metrics.update({k: (float(v) * tokens, tokens) for k, v in m.items()})
        metrics.update({k: (v, 1.0) for k, v in batch["rollout_metrics"].items()})
        return loss_sum, metrics

    def eval_step(self, model: torch.nn.Module, batch: dict[str, Any]) -> MetricSums:
        return eval_rewards(self.samplers["eval"], model, batch["indices"], self.reward_fns, self.cfg)


def eval_groups(sampler: RolloutSampler | None, size: int) -> list[list[int]]:
    n = len(sampler.examples) if sampler else 0
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


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


# ----------------------------------------------------------------------------------------------- the driver


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


def train_grpo(cfg: GRPOConfig, advantage_fn: AdvantageFn | None = None, kl_in_reward: bool = False,
               run_name: str = "grpo", check: Callable[[Any], None] | None = None) -> Any:
    """GRPO end to end (RLOO with its advantages): prompts → rollouts → loop → final model in cfg.output_dir."""
    from prefalign.data.templates import resolve_chat_template
    from prefalign.model.load import load_policy, load_tokenizer
    from prefalign.model.reference import build_reference
    from prefalign.train.run import make_accelerator, start_run, train_and_save

    (check or check_grpo_config)(cfg)
    accelerator = make_accelerator(cfg)
    tokenizer = load_tokenizer(cfg)
    resolve_chat_template(tokenizer, cfg.chat_template)
    train, eval_ = load_rl_data(cfg, tokenizer, accelerator)
    reward_fns = load_reward_functions(cfg, accelerator.device)
    model = load_policy(cfg, gradient_checkpointing=cfg.gradient_checkpointing).to(accelerator.device)
    if cfg.disable_dropout:
        disable_dropout(model)
    reference = build_reference(model, cfg, None, cfg.beta != 0)  # type: ignore[arg-type]
    start_run(cfg, accelerator, cfg, run_name)
    stage = GRPOStage(cfg, model, train, eval_, reward_fns, reference, accelerator.num_processes, advantage_fn,
                      kl_in_reward)
    return train_and_save(stage, model, tokenizer, cfg, accelerator)


CONFIG = GRPOConfig


def run_command(cfg: GRPOConfig) -> None:
    """`prefalign grpo`."""
    print_summary("grpo", train_grpo(cfg), cfg.output_dir, ("reward", "reward_std", "kl", "completions/mean_length"))
