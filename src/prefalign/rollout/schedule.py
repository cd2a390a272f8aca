"""Which prompts each rollout of an epoch samples, and the seed it samples with.

Rollouts are seeded by (seed, epoch, rollout), so a run is reproducible and a resumed run samples what the
uninterrupted one would have (a resume in the middle of a rollout's optimizer steps resamples it from the resumed
weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RolloutRows:
    """One micro-batch of an on-policy stage: rows `rows` (completions) of rollout `rollout` of `epoch`."""

    epoch: int
    rollout: int
    rows: tuple[int, ...]

    def __len__(self) -> int:  # the loop counts a micro-batch's examples with len()
        return len(self.rows)


def plan_rollouts(num_prompts: int, prompts_per_rollout: int, seed: int, epoch: int) -> list[list[int]]:
    """Prompt indices of each rollout of an epoch: a (seed, epoch) shuffle, the last rollout filled up cyclically."""
    order = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    count = math.ceil(num_prompts / prompts_per_rollout)
    order = (order * math.ceil(count * prompts_per_rollout / num_prompts))[: count * prompts_per_rollout]
    return [order[i : i + prompts_per_rollout] for i in range(0, len(order), prompts_per_rollout)]


def rollout_seed(seed: int, epoch: int, rollout: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + rollout) % (2**63)


class RolloutPlan:
    """The rollouts of each epoch (prompt indices), computed once per epoch."""

    def __init__(self, num_prompts: int, prompts_per_rollout: int, seed: int) -> None:
        self.num_prompts, self.prompts_per_rollout, self.seed = num_prompts, prompts_per_rollout, seed
        self._epoch: tuple[int, list[list[int]]] | None = None

    def __call__(self, epoch: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, plan_rollouts(self.num_prompts, self.prompts_per_rollout, self.seed, epoch))
        return self._epoch[1]
