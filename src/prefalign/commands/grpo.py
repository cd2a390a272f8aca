"""`prefalign grpo`: group relative policy optimisation with reward functions or models."""

from __future__ import annotations

from prefalign.config import GRPOConfig
from prefalign.stages.grpo import train_grpo
from prefalign.train.setup import print_summary


def run_command(cfg: GRPOConfig) -> None:
    print_summary("grpo", train_grpo(cfg), cfg.output_dir, ("reward", "reward_std", "kl", "completions/mean_length"))
