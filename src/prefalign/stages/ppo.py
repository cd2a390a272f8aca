"""PPO (`prefalign ppo`): policy, frozen reference, reward, value model and GAE, an algorithm of the shared rollout
stage (`stages.rollout`).

A rollout samples one completion for each of B x A x processes x `--num_mini_batches` prompts and, without
grad, takes the sampling policy's and the reference's log-probs and the value model's values. The score of a
completion (reward model and/or reward functions, `--missing_eos_penalty` for those that never stop) lands on
its last real token, -kl_coef·KL on every token; GAE turns these into advantages (whitened) and returns. Then
`--num_ppo_epochs` passes, each a fresh shuffle split into `--num_mini_batches` mini-batches of B x A x processes
completions: one optimizer step per mini-batch (A micro-batches of B each), so a rollout gives
num_ppo_epochs x num_mini_batches optimizer steps, and the learning-rate schedule advances once per optimizer step.
This is the PPO of the papers, not TRL's: TRL's (experimental) PPOTrainer accumulates gradients over
gradient_accumulation_steps micro-batches whatever `num_mini_batches` is, so with accumulation a multiple of
num_mini_batches it takes one optimizer step per PPO epoch, over a rollout num_mini_batches times smaller, and steps
its schedule once per rollout.

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

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from prefalign.config import PPOConfig
from prefalign.errors import PrefalignError
from prefalign.losses.ppo import compute_gae, ppo_loss, ppo_rewards
from prefalign.losses.stats import KL_ESTIMATORS
from prefalign.model.load import load_score_model
from prefalign.model.logprobs import completion_logps, left_align
from prefalign.model.reference import Reference, inference
from prefalign.model.weights import full_state_dict, is_main_process, load_weights_into
from prefalign.rollout.sampling import CompletionGroups
from prefalign.stages.rollout import ScoredRollout, ShuffledMiniBatches, check_rl_config, train_online
from prefalign.train.loop import LoopResult
from prefalign.train.setup import Session, disable_dropout

logger = logging.getLogger(__name__)


def check_ppo_config(cfg: PPOConfig) -> None:
    check_rl_config(cfg)
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
    """The separate value model (a one-output sequence classifier), or None for a head on the policy."""
    if cfg.shared_value_head or not (cfg.value_model_name_or_path or cfg.reward_model_name_or_path):
        return None
    path = cfg.value_model_name_or_path or cfg.reward_model_name_or_path
    flag = "--value_model_name_or_path" if cfg.value_model_name_or_path else "--reward_model_name_or_path"
    return load_score_model(path, flag).to(device)


# ----------------------------------------------------------------------------------------------- the algorithm


class PPO:
    """GAE advantages and the clipped policy + value loss; an `Algorithm` of `stages.rollout` whose trained model is
    the policy with its value function (`PolicyAndValue`)."""

    progress_keys = {"objective/scores": "score", "objective/kl": "kl", "policy/approxkl_avg": "approxkl"}
    eval_reward_name = "objective/scores"
    num_generations = 1
    per_token = True
    shares_prompts = False  # one completion per prompt, and the value head reads the padded layout

    def __init__(self, cfg: PPOConfig, wrapper: PolicyAndValue, reference: Reference) -> None:
        self.cfg, self.wrapper, self.reference = cfg, wrapper, reference
        self.model, self.policy = wrapper, wrapper.policy
        self.batching = ShuffledMiniBatches(cfg.per_device_train_batch_size, cfg.num_mini_batches, cfg.num_ppo_epochs,
                                            cfg.seed)
        self._warned_unscored = False

    def forward_passes(self, groups: CompletionGroups, loss_mask: Tensor, packed: bool) -> dict[str, Tensor]:
        """The sampling policy's log-probs and values and the reference's log-probs (padded rows: the value head
        reads positions of the padded layout)."""
        chunk, n = self.cfg.per_device_train_batch_size, len(groups)
        tc = int(groups.lengths.max())
        logps = torch.zeros(n, tc, device=groups.completion_ids.device)
        values = torch.zeros_like(logps)
        with inference(self.wrapper):
            for start in range(0, n, chunk):
                part = {k: v.to(logps.device) if isinstance(v, Tensor) else v
                        for k, v in groups.batch(range(start, min(start + chunk, n)), packed=False).items()}
                lp, _, v = self.wrapper.evaluate(part, self.cfg.temperature)
                logps[start : start + lp.size(0), : lp.size(1)] = lp
                values[start : start + v.size(0), : v.size(1)] = v
        ref = groups.logps(self.reference.model, chunk, self.cfg.temperature, False, self.reference.weights)
        return {"old_logps": logps, "old_values": values, "ref_logps": ref}

    def prepare(self, rollout: ScoredRollout) -> tuple[dict[str, Tensor], dict[str, float]]:
        cfg, mask, passes = self.cfg, rollout.groups.completion_mask, rollout.passes  # (N, Tc)
        # A completion no reward function scored (every one returned None) has a nan score; the stage has already
        # refused a rollout with no score at all. Such completions get score 0 (only the KL penalty), and are
        # counted in objective/unscored and said once.
        unscored = int(torch.isnan(rollout.rewards).sum())
        if unscored and not self._warned_unscored:
            logger.warning("ppo: %d of %d completions have no score (every reward function returned None); they "
                           "are scored 0, so only the KL penalty trains them (objective/unscored counts them)",
                           unscored, rollout.rewards.numel())
            self._warned_unscored = True
        rewards, objective = ppo_rewards(
            torch.nan_to_num(rollout.rewards, nan=0.0), passes["old_logps"], passes["ref_logps"], mask,
            kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, missing_eos_penalty=cfg.missing_eos_penalty,
            contains_eos=~rollout.is_truncated, whiten_rewards=cfg.whiten_rewards,
        )
        advantages, returns = compute_gae(rewards, passes["old_values"], mask, gamma=cfg.gamma, lam=cfg.lam)
        kept = {"old_logps": passes["old_logps"], "old_values": passes["old_values"], "advantages": advantages,
                "returns": returns}
        return kept, {**{k: float(v) for k, v in objective.items()}, "objective/unscored": float(unscored)}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        logps, entropy, values = model.evaluate(batch, cfg.temperature, with_entropy=True)
        return ppo_loss(logps, batch["old_logps"], batch["advantages"], values, batch["old_values"],
                        batch["returns"], batch["loss_mask"], cliprange=cfg.cliprange,
                        cliprange_value=cfg.cliprange_value, vf_coef=cfg.vf_coef, entropies=entropy)

    def save_extra(self, directory: Path) -> None:
        """The value model (value_model/ or value_head.safetensors). Every process calls this (sharded weights are
        gathered); the main process writes."""
        wrapper = self.wrapper
        module = wrapper.value_model if wrapper.value_model is not None else wrapper.value_head
        state = full_state_dict(module)  # None unless sharded
        if not is_main_process():
            return
        if wrapper.value_model is not None:
            wrapper.value_model.save_pretrained(directory / "value_model", state_dict=state)
        else:
            state = state if state is not None else wrapper.value_head.state_dict()
            save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "value_head.safetensors"))

    def load_extra(self, directory: Path) -> None:
        if self.wrapper.value_model is not None:  # also reads the sharded files save_pretrained writes for large models
            load_weights_into(self.wrapper.value_model, directory / "value_model")
        else:
            self.wrapper.value_head.load_state_dict(load_file(directory / "value_head.safetensors"))


def train_ppo(cfg: PPOConfig) -> LoopResult:
    """PPO end to end: prompts → rollouts → GAE → loop → final policy in cfg.output_dir."""
    check_ppo_config(cfg)

    def make(policy: nn.Module, reference: Reference | None, session: Session) -> PPO:
        wrapper = PolicyAndValue(policy, load_value_model(cfg, session.device))
        if cfg.disable_dropout:  # TRL's PPO always does: the ratio must be 1 before the first update
            disable_dropout(wrapper)
        return PPO(cfg, wrapper, reference)

    return train_online(cfg, make, "ppo", needs_reference=True)
