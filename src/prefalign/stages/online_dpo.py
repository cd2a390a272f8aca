"""Online DPO (`prefalign online-dpo`): preference pairs sampled from the current policy and judged, then a DPO
step; an algorithm of the shared rollout stage (`stages.rollout`), as TRL's OnlineDPOTrainer does it.

One optimizer step = one rollout of B x A x processes prompts (`--per_device_train_batch_size` counts prompts, as
in TRL), each sampled `--num_generations` times (TRL: 2) with the KV cache and scored by the reward functions
and/or reward model (`--missing_eos_penalty` subtracted from completions without EOS). Per prompt the best
completion is chosen (the first on ties) and the worst rejected (the last on ties: with two samples, sample 1 is
chosen iff its score >= sample 2's, TRL's rule). The pair's log-probs (policy with grad, reference without) are
computed on the pairs' rows only, in the shared-prompt packed layout of GRPO (`--share_prompt`, on by default: each
prompt once, its two completions attending to it; padded rows where the model does not allow it), and go
through the same `Objective` as `prefalign dpo` (`stages.dpo.preference_objective`: every registered loss, with
its flags), at temperature 1; the reference is the initial policy (or --ref_model_name_or_path, or the base with
the adapter disabled under LoRA).

Normalisation: the loss is the mean over the step's pairs (sums here, divided by the step's rows in the loop), so
B x A equals A·B x 1. TRL does not divide by the accumulation steps before backward (its gradients grow with
A); we do. With `--mask_truncated_completions`, a pair with a completion that hit the length limit adds no loss.

Metrics (TRL's names): objective/kl, objective/entropy, objective/non_score_reward, objective/rlhf_reward,
objective/scores, objective/scores_margin, rewards/chosen|rejected|margins|accuracies, logps/chosen|rejected,
val/contain_eos_token, beta. The per-completion sums are over real completion tokens (TRL's kl and entropy also
sum the padding after EOS).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prefalign.config import OnlineDPOConfig
from prefalign.errors import PrefalignError
from prefalign.losses.aggregate import preference_inputs
from prefalign.losses.preference import Objective, compute_preference_loss
from prefalign.model.logprobs import completion_logps
from prefalign.model.reference import Reference
from prefalign.rollout.sampling import CompletionGroups
from prefalign.stages.dpo import preference_objective
from prefalign.stages.rollout import ScoredRollout, check_rl_config, train_online
from prefalign.train.loop import LoopResult
from prefalign.train.setup import Session


def check_online_dpo_config(cfg: OnlineDPOConfig) -> Objective:
    """Everything checkable before loading: the sampling flags, the pair group, and the preference losses."""
    check_rl_config(cfg)
    if cfg.num_generations < 2:
        raise PrefalignError(f"must be at least 2 (a pair needs two completions), got {cfg.num_generations}",
                             "--num_generations")
    return preference_objective(cfg)


@dataclass(frozen=True)
class PromptGroups:
    """Micro-batches of whole prompts: `prompts` prompts x `generations` completions each, in order."""

    prompts: int
    generations: int

    def rollout_rows(self, step_rows: int) -> int:
        return step_rows * self.generations  # step_rows counts prompts here

    def micro_batches(self, epoch: int, r: int, rows: int) -> list[tuple[int, ...]]:
        size = self.prompts * self.generations
        return [tuple(range(k, k + size)) for k in range(0, rows, size)]


def select_pairs(scores: Tensor, generations: int) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) row indices (P,) of each prompt's group of `generations` consecutive rows: the first
    best and the last worst score (NaN counts as the worst), so ties keep the first sample as chosen."""
    grouped = torch.nan_to_num(scores.float(), nan=-torch.inf).view(-1, generations)  # (P, G)
    base = torch.arange(grouped.size(0), device=scores.device) * generations
    chosen = grouped.argmax(1)  # the first maximum
    rejected = generations - 1 - grouped.flip(1).argmin(1)  # the last minimum
    return base + chosen, base + rejected


class OnlineDPO:
    """Sampled pairs and a preference loss; an `Algorithm` of `stages.rollout`."""

    progress_keys = {"objective/scores": "score", "rewards/margins": "margin", "objective/kl": "kl"}
    eval_reward_name = "objective/scores"
    per_token = False
    shares_prompts = True  # a pair's two completions attend to one copy of its prompt (`forward_rows`)
    row_weighted_metrics = True
    batch_unit = "prompts"

    def __init__(self, cfg: OnlineDPOConfig, objective: Objective, policy: nn.Module,
                 reference: Reference | None) -> None:
        self.cfg, self.objective, self.reference = cfg, objective, reference
        self.model = self.policy = policy
        self.num_generations = cfg.num_generations
        self.batching = PromptGroups(cfg.per_device_train_batch_size, cfg.num_generations)

    def forward_passes(self, groups: CompletionGroups, loss_mask: Tensor, packed: bool) -> dict[str, Tensor]:
        return {}  # the reference's log-probs are taken with the policy's, in `loss`

    def prepare(self, rollout: ScoredRollout) -> tuple[dict[str, Tensor], dict[str, float]]:
        cfg, rewards = self.cfg, rollout.rewards
        truncated = rollout.is_truncated.to(rewards.device).bool()
        scores = rewards.clone()
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * truncated.float()
        chosen, rejected = select_pairs(scores, cfg.num_generations)
        rank = torch.full_like(scores, -1, dtype=torch.long)
        rank[chosen], rank[rejected] = 0, 1
        metrics = {"objective/scores": float(scores.nanmean()),
                   "objective/scores_margin": float((scores[chosen] - scores[rejected]).nanmean()),
                   "val/contain_eos_token": float((~truncated).float().mean()), "beta": cfg.beta}
        return {"pair_rank": rank, "scores": scores}, metrics

    def forward_rows(self, rows: Sequence[int], tensors: dict[str, Tensor]) -> list[int]:
        """The rows the loss's forwards score, out of a micro-batch of whole prompt groups: the chosen rows, then
        the rejected ones (the layout of CompletionLogps), each list in prompt order. Packed, a prompt's two rows
        share one copy of it (`CompletionGroups.batch`); the other samples are not run at all."""
        rows = list(rows)
        rank = tensors["pair_rank"][rows].tolist()
        return [r for r, k in zip(rows, rank) if k == 0] + [r for r, k in zip(rows, rank) if k == 1]

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        # the model input holds the pairs' rows (`forward_rows`: P chosen, then P rejected); the per-row tensors the
        # micro-batch's b = P x G rows in order, so `pair_rank` picks the pairs' rows out of them in the same order
        rank = batch["pair_rank"]  # (b,)
        pick = torch.cat([(rank == 0).nonzero().squeeze(1), (rank == 1).nonzero().squeeze(1)])  # (2P,)
        policy = completion_logps(model, batch, with_wpo=self.objective.use_weighting)
        ref = self.reference.logps(batch) if self.objective.needs_reference else None
        inputs = preference_inputs(policy, ref, self.objective)
        out = compute_preference_loss(inputs, self.objective)
        losses = out.losses  # (P,)
        if self.cfg.mask_truncated_completions:  # the loss mask is empty for a completion without EOS
            kept = batch["loss_mask"][pick].sum(1).gt(0).view(2, -1).all(0)  # (P,)
            losses = losses * kept.to(losses.dtype)
        return losses.mean(), pair_metrics(self.cfg.beta, inputs, out, policy, ref, batch["scores"][pick])


def pair_metrics(beta: float, inputs: Any, out: Any, policy: Any, ref: Any, scores: Tensor) -> dict[str, Tensor]:
    """TRL's OnlineDPO metrics of one micro-batch's pairs, as means over pairs (or over its 2P completions)."""
    chosen_r, rejected_r = out.chosen_rewards.detach(), out.rejected_rewards.detach()
    mask = policy.mask
    logps = policy.token_logps.detach()  # (2P, Tc), 0 outside the mask
    metrics = {
        "rewards/chosen": chosen_r.mean(), "rewards/rejected": rejected_r.mean(),
        "rewards/margins": (chosen_r - rejected_r).mean(),
        "rewards/accuracies": (chosen_r > rejected_r).float().mean(),
        "logps/chosen": inputs.chosen_logps.detach().mean(), "logps/rejected": inputs.rejected_logps.detach().mean(),
        "objective/entropy": -(logps * mask).sum(1).mean(),
    }
    if ref is not None:
        kl = ((logps - ref.token_logps) * mask).sum(1)  # (2P,) sequence k1 of each completion
        metrics["objective/kl"] = kl.mean()
        metrics["objective/non_score_reward"] = (-beta * kl).mean()
        metrics["objective/rlhf_reward"] = (torch.nan_to_num(scores.float()) - beta * kl).mean()
    return metrics


def train_online_dpo(cfg: OnlineDPOConfig) -> LoopResult:
    """Online DPO end to end: prompts → sampled, judged pairs → DPO steps → final model in cfg.output_dir."""
    objective = check_online_dpo_config(cfg)

    def make(policy: nn.Module, reference: Reference | None, session: Session) -> OnlineDPO:
        return OnlineDPO(cfg, objective, policy, reference)

    return train_online(cfg, make, "online-dpo", needs_reference=objective.needs_reference,
                        why_no_reference=f"{', '.join(cfg.loss_type)} needs none")
