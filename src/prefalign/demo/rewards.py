"""The demo task's judge as a GRPO reward function (`--reward_funcs prefalign.demo.rewards:judge_reward`)."""

from __future__ import annotations

from typing import Any

from prefalign.demo import task


def judge_reward(prompts: list, completions: list, **columns: Any) -> list[float]:
    """1.0 when the task's judge accepts the completion (the sum a + b after '='), else 0.0.

    The reward-function signature of `prefalign.rollout.rewards`: prompts are strings or message lists, completions
    strings or one-message lists; other dataset columns are ignored.
    """
    return [1.0 if task.judge(p, c) else 0.0 for p, c in zip(prompts, completions)]
