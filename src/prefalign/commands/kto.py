"""`prefalign kto`: Kahneman-Tversky optimisation on unpaired feedback (or preference pairs, unpaired)."""

from __future__ import annotations

from prefalign.config import KTOConfig
from prefalign.stages.kto import train_kto
from prefalign.train.setup import print_summary


def run_command(cfg: KTOConfig) -> None:
    print_summary("kto", train_kto(cfg), cfg.output_dir, ("loss", "kl", "rewards/margins", "eval_rewards/margins"))
