"""`prefalign rloo`: REINFORCE leave-one-out with the KL in the reward."""

from __future__ import annotations

from prefalign.config import RLOOConfig
from prefalign.stages.rloo import train_rloo
from prefalign.train.setup import print_summary


def run_command(cfg: RLOOConfig) -> None:
    print_summary("rloo", train_rloo(cfg), cfg.output_dir, ("reward", "reward_std", "kl", "completions/mean_length"))
