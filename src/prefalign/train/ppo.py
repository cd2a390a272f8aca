"""PPO (`prefalign ppo`): policy, frozen reference, reward, value model and GAE on the shared loop.

A rollout samples one completion for each of B x A x processes x `--num_mini_batches` prompts and, without
grad, takes the sampling policy's and the reference's log-probs and the value model's values. The score of a
completion (reward model and/or reward functions, `--missing_eos_penalty` for those that never stop) lands on
its last real token, -kl_coef·KL on every token; GAE turns these into advantages (whitened) and returns. Then
`--num_ppo_epochs` passes, each a fresh shuffle split into `--num_mini_batches` mini-batches of B x A x processes
completions: one optimizer step per mini-batch, A micro-batches of B each (TRL's rollout / mini / micro batch).

The value model is a sequence-classification model (`--value_model_name_or_path`, default: a copy of the reward
model, as TRL initialises it) whose score head is applied at every position, or, with `--shared_value_head` (the
default when no reward model is given), a linear head on the policy's own final hidden states, fed by the same
forward that gives the log-probs. The loop trains policy and value together (one AdamW, one clipping norm).

Normalisation: the policy and value losses are token means over the whole mini-batch (sums here, divided by the
mini-batch's real tokens in the loop), so B x A == A·B x 1; TRL averages per-micro-batch token means, which agrees
at gradient_accumulation_steps=1. Checkpoints hold the value model (value_model/ or value_head.safetensors);
the final output is the policy alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prefalign.config import DataArgs, ModelArgs, TrainArgs
from prefalign.errors import PrefalignError
from prefalign.losses.policy import KL_ESTIMATORS
from prefalign.losses.ppo import compute_gae, ppo_loss, ppo_rewards
from prefalign.model.logprobs import completion_logps, left_align
from prefalign.train.metrics import MetricSums, to_host
from prefalign.train.rollout import (
    GenerationArgs,
    RewardArgs,
    RolloutSampler,
    RolloutSchedule,
    RolloutStage,
    check_rl_config,
    eval_rewards,
    inference,
    load_reward_functions,
    load_rl_data,
    reference_weights,
    rollout_logps,
    rollout_seed,
    take_rows,
)
from prefalign.train.run import disable_dropout, print_summary


@dataclass
class PPOArgs:
    value_model_name_or_path: str | None = None
    """Value model, a sequence-classification checkpoint (default: initialised from the reward model)."""
    shared_value_head: bool = False
    """Use a linear value head on the policy's backbone instead of a separate value model."""
    kl_coef: float = 0.05
    """Weight of the per-token KL penalty in the reward."""
    kl_estimator: str = "k1"
    """Per-token KL estimator in the reward: k1 (log-ratio) or k3 (always non-negative)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of completions that reach --max_completion_length without EOS."""
    gamma: float = 1.0
    """Discount factor of GAE."""
    lam: float = 0.95
    """Lambda of GAE (bias/variance trade-off of the advantage estimate)."""
    whiten_rewards: bool = False
    """Scale the per-token rewards to unit variance over the rollout before GAE."""
    cliprange: float = 0.2
    """Clipping range of the policy ratio."""
    cliprange_value: float = 0.2
    """Clipping range of the value update around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    num_ppo_epochs: int = 4
    """Passes over each rollout."""
    num_mini_batches: int = 1
    """Mini-batches (optimizer steps) per pass over a rollout."""


@dataclass
class PPOConfig(PPOArgs, RewardArgs, GenerationArgs, TrainArgs, DataArgs, ModelArgs):
    """Configuration of `prefalign ppo`."""

    learning_rate: float = 3e-6
    """Peak learning rate of AdamW (TRL's PPO default)."""
    per_device_train_batch_size: int = 8
    """Prompts (one completion each) per micro-batch on each device."""
    num_generations: int = 1
    """Completions per prompt (PPO samples one)."""
    temperature: float = 0.7
    """Sampling temperature; log-probs are computed at the same temperature (TRL's PPO default)."""
    max_prompt_length: int | None = 512
    """Longest prompt in tokens; longer prompts are cut per --truncation_mode."""
    max_completion_length: int | None = 53
    """Most tokens sampled per completion (TRL's response_length)."""


def check_ppo_config(cfg: PPOConfig) -> None:
    check_rl_config(cfg)
    if cfg.num_generations != 1:
        raise PrefalignError("PPO samples one completion per prompt; use grpo or rloo for groups", "--num_generations")
    if cfg.kl_estimator not in KL_ESTIMATORS:
        raise PrefalignError(f"must be one of {', '.join(KL_ESTIMATORS)}, got {cfg.kl_estimator!r}", "--kl_estimator")
    for flag in ("num_ppo_epochs", "num_mini_batches"):
        if getattr(cfg, flag) < 1:
            raise PrefalignError(f"must be at least 1, got {getattr(cfg, flag)}", f"--{flag}")
    if cfg.value_model_name_or_path and not Path(cfg.value_model_name_or_path).is_dir():
        raise PrefalignError("no such value model directory", f"--value_model_name_or_path {cfg.value_model_name_or_path}")


# ----------------------------------------------------------------------------------------------- value model


def _decoder(model: nn.Module) -> nn.Module:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder()


class PolicyAndValue(nn.Module):
    """What the loop optimises: the policy and its value function (a separate model, or a head on the policy)."""

    def __init__(self, policy: nn.Module, value_model: nn.Module | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        hidden = policy.config.get_text_config().hidden_size
        # zero init: the first value estimates are 0, as a fresh head should not invent returns
        self.value_head = nn.Linear(hidden, 1) if value_model is None else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
            self.value_head.to(next(policy.parameters()).device)

    def fsdp_units(self) -> list[nn.Module]:
        """The modules whose forward is called directly; under FSDP each is sharded as its own root."""
        return [m for m in (self.policy, self.value_model, self.value_head) if m is not None]

    def evaluate(self, batch: dict[str, Any], temperature: float, with_entropy: bool = False) -> tuple[Tensor, Tensor | None, Tensor]:
        """Token log-probs (b, Tc), entropies (b, Tc) and values (b, Tc) of a padded-layout batch."""
        captured: list[Tensor] = []
        handle = None
        if self.value_head is not None:  # capture the policy's final hidden states from its own forward
            handle = _decoder(self.policy).register_forward_hook(
                lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out.last_hidden_state))
        try:
            out = completion_logps(self.policy, batch, with_entropy=with_entropy, temperature=temperature)
        finally:
            if handle is not None:
                handle.remove()
        if self.value_head is not None:
            hidden, head = captured[-1], self.value_head
        else:
            backbone = self.value_model.base_model
            hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).last_hidden_state  # (b, T, H)
            head = self.value_model.score
        completion = batch["completion_mask"].bool()
        rows, cols = completion.nonzero(as_tuple=True)
        slots = (completion.cumsum(1) - 1)[rows, cols]
        # the value of the state before token t sits where the log-prob of t is read: position t-1
        flat = head(hidden[rows, cols - 1].to(head.weight.dtype)).squeeze(-1).float()  # (n,)
        values = left_align(flat, rows, slots, completion.size(0), out.token_logps.size(1))
        return out.token_logps, out.entropy, values


def load_value_model(cfg: PPOConfig, device: Any) -> nn.Module | None:
    from transformers import AutoModelForSequenceClassification

    if cfg.shared_value_head or not (cfg.value_model_name_or_path or cfg.reward_model_name_or_path):
        return None
    path = cfg.value_model_name_or_path or cfg.reward_model_name_or_path
    flag = "--value_model_name_or_path" if cfg.value_model_name_or_path else "--reward_model_name_or_path"
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    except (OSError, ValueError) as e:
        raise PrefalignError(f"cannot load a value model from {path}: {str(e).splitlines()[0]}", flag) from None
    if not hasattr(model, "score"):
        raise PrefalignError("the value model has no `score` head (not a decoder classifier)", flag)
    return model.to(device)


# ----------------------------------------------------------------------------------------------- the stage


class PPOStage(RolloutStage):
    """PPO for the loop (see train.loop.Stage); `model` in step is the PolicyAndValue wrapper."""

    progress_keys = {"objective/scores": "score", "objective/kl": "kl", "policy/approxkl_avg": "approxkl"}

    def __init__(self, cfg: PPOConfig, wrapper: PolicyAndValue, train: RolloutSampler, eval_: RolloutSampler | None,
                 reward_fns: list, reference: Any, num_processes: int = 1) -> None:
        self.cfg, self.wrapper, self.reward_fns, self.reference = cfg, wrapper, reward_fns, reference
        self.samplers = {"train": train, "eval": eval_}
        self.mini_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * num_processes
        self.schedule = RolloutSchedule(len(train.examples), self.mini_batch * cfg.num_mini_batches, cfg.seed,
                                        self._micro_batches, self._sample_and_score)

    def _micro_batches(self, epoch: int, r: int) -> list[tuple[int, ...]]:
        cfg, b = self.cfg, self.cfg.per_device_train_batch_size
        out = []
        for ppo_epoch in range(cfg.num_ppo_epochs):  # each pass reshuffles the rollout into mini-batches
            generator = torch.Generator().manual_seed(rollout_seed(cfg.seed, epoch, r) + ppo_epoch)
            order = torch.randperm(self.mini_batch * cfg.num_mini_batches, generator=generator).tolist()
            out += [tuple(order[k : k + b]) for k in range(0, len(order), b)]
        return out

    def _sample_and_score(self, epoch: int, r: int) -> dict[str, Any]:
        cfg = self.cfg
        s, batch, scores, metrics, loss_mask = self.sample_rollout(self.wrapper.policy, epoch, r, 1)
        device = s.token_mask.device
        mask = s.token_mask  # (N, Tc)
        logps, values = self._old_logps_and_values(batch)
        model, weights = reference_weights(self.reference)
        ref = rollout_logps(model, batch, cfg.per_device_train_batch_size, cfg.temperature, weights)
        rewards, objective = ppo_rewards(
            torch.nan_to_num(scores.to(device), nan=0.0), logps, ref, mask, kl_coef=cfg.kl_coef,
            kl_estimator=cfg.kl_estimator, missing_eos_penalty=cfg.missing_eos_penalty,
            contains_eos=~s.is_truncated, whiten_rewards=cfg.whiten_rewards,
        )
        advantages, returns = compute_gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
        tensors = {**batch, "loss_mask": loss_mask, "old_logps": logps, "old_values": values,
                   "advantages": advantages, "returns": returns}
        metrics.update({k: float(v) for k, v in objective.items()})
        return self.finish_rollout(s, tensors, loss_mask, metrics)

    def _old_logps_and_values(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        n, chunk = batch["input_ids"].size(0), self.cfg.per_device_train_batch_size
        tc = int(batch["completion_mask"].sum(1).max())
        logps = torch.zeros(n, tc, device=batch["input_ids"].device)
        values = torch.zeros_like(logps)
        with inference(self.wrapper):
            for start in range(0, n, chunk):
                part = take_rows(batch, range(start, min(start + chunk, n)))
                lp, _, v = self.wrapper.evaluate(part, self.cfg.temperature)
                logps[start : start + lp.size(0), : lp.size(1)] = lp
                values[start : start + v.size(0), : v.size(1)] = v
        return logps, values

    def step(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, MetricSums]:
        cfg = self.cfg
        logps, entropy, values = model.evaluate(batch, cfg.temperature, with_entropy=True)
        mask = batch["loss_mask"]
        loss, m = ppo_loss(logps, batch["old_logps"], batch["advantages"], values, batch["old_values"],
                           batch["returns"], mask, cliprange=cfg.cliprange, cliprange_value=cfg.cliprange_value,
                           vf_coef=cfg.vf_coef, entropies=entropy)
        tokens_t = mask.sum().to(loss.dtype)
        loss_sum = loss * tokens_t  # token sums; the loop divides by the mini-batch's real tokens
        host = to_host({"tokens": tokens_t, "loss": loss_sum, **m})
        tokens = host.pop("tokens")
        metrics: MetricSums = {"loss": (host.pop("loss"), tokens)}
        metrics.update({k: (v * tokens, tokens) for k, v in host.items()})
        metrics.update({k: (v, 1.0) for k, v in batch["rollout_metrics"].items()})
        return loss_sum, metrics

    def eval_step(self, model: nn.Module, batch: dict[str, Any]) -> MetricSums:
        return eval_rewards(self.samplers["eval"], self.wrapper.policy, batch["indices"], self.reward_fns, self.cfg,
                            reward_name="objective/scores")


# ----------------------------------------------------------------------------------------------- the driver


def _save_value(wrapper: PolicyAndValue, directory: Path) -> None:
    """Every process calls this (sharded weights are gathered); the main process writes."""
    from safetensors.torch import save_file

    from prefalign.model.weights import full_state_dict, is_main_process

    module = wrapper.value_model if wrapper.value_model is not None else wrapper.value_head
    state = full_state_dict(module)  # None unless sharded
    if not is_main_process():
        return
    if wrapper.value_model is not None:
        wrapper.value_model.save_pretrained(directory / "value_model", state_dict=state)
    else:
        state = state if state is not None else wrapper.value_head.state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "value_head.safetensors"))


def _load_value(wrapper: PolicyAndValue, directory: Path) -> None:
    from safetensors.torch import load_file

    from prefalign.model.weights import load_weights_into

    if wrapper.value_model is not None:  # also reads the sharded files save_pretrained writes for large models
        load_weights_into(wrapper.value_model, directory / "value_model")
    else:
        wrapper.value_head.load_state_dict(load_file(directory / "value_head.safetensors"))


def train_ppo(cfg: PPOConfig) -> Any:
    """PPO end to end: prompts → rollouts → GAE → loop → final policy in cfg.output_dir."""
    from prefalign.data.templates import resolve_chat_template
    from prefalign.model.load import load_policy, load_tokenizer, save_model
    from prefalign.model.reference import build_reference
    from prefalign.model.weights import load_weights_into
    from prefalign.train.run import make_accelerator, train_and_save

    check_ppo_config(cfg)
    accelerator = make_accelerator(cfg)
    tokenizer = load_tokenizer(cfg)
    resolve_chat_template(tokenizer, cfg.chat_template)
    train, eval_ = load_rl_data(cfg, tokenizer, accelerator)
    reward_fns = load_reward_functions(cfg, accelerator.device)
    policy = load_policy(cfg, gradient_checkpointing=cfg.gradient_checkpointing).to(accelerator.device)
    reference = build_reference(policy, cfg, True)
    wrapper = PolicyAndValue(policy, load_value_model(cfg, accelerator.device))
    if cfg.disable_dropout:  # TRL's PPO always does: the ratio must be 1 before the first update
        disable_dropout(wrapper)
    stage = PPOStage(cfg, wrapper, train, eval_, reward_fns, reference, accelerator.num_processes)

    def save(directory: Path) -> None:
        save_model(policy, tokenizer, directory, False)
        _save_value(wrapper, directory)

    def load(directory: Path) -> None:
        load_weights_into(policy, directory)
        _load_value(wrapper, directory)

    return train_and_save(stage, wrapper, tokenizer, cfg, accelerator, "ppo", final_model=policy, save=save, load=load)


CONFIG = PPOConfig


def run_command(cfg: PPOConfig) -> None:
    """`prefalign ppo`."""
    result = train_ppo(cfg)
    print_summary("ppo", result, cfg.output_dir, ("objective/scores", "objective/kl", "policy/approxkl_avg",
                                                  "loss/value_avg"))
