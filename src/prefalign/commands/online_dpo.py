"""`prefalign online-dpo`: DPO on pairs sampled from the current policy and judged by rewards (TRL's OnlineDPO)."""

from __future__ import annotations

from prefalign.config import OnlineDPOConfig
from prefalign.stages.online_dpo import train_online_dpo
from prefalign.train.setup import print_summary


def run_command(cfg: OnlineDPOConfig) -> None:
    print_summary("online-dpo", train_online_dpo(cfg), cfg.output_dir,
                  ("objective/scores", "rewards/margins", "objective/kl", "eval_objective/scores"))
