"""`prefalign dpo`: direct preference optimisation (and its variants) on preference pairs."""

from __future__ import annotations

from prefalign.config import DPOConfig
from prefalign.stages.dpo import train_dpo
from prefalign.train.setup import print_summary


def run_command(cfg: DPOConfig) -> None:
    print_summary("dpo", train_dpo(cfg), cfg.output_dir, ("loss", "rewards/accuracies", "rewards/margins", "eval_rewards/accuracies"))
