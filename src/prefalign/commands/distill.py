"""`prefalign distill`: on-policy distillation of a teacher into a student (TRL's GKD)."""

from __future__ import annotations

from prefalign.config import DistillConfig
from prefalign.stages.distill import train_distill
from prefalign.train.setup import print_summary


def run_command(cfg: DistillConfig) -> None:
    print_summary("distill", train_distill(cfg), cfg.output_dir, ("loss", "on_policy", "eval_loss"))
