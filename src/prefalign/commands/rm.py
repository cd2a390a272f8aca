"""`prefalign rm`: train a Bradley-Terry reward model on preference pairs."""

from __future__ import annotations

from prefalign.config import RMConfig
from prefalign.stages.rm import train_rm
from prefalign.train.setup import print_summary


def run_command(cfg: RMConfig) -> None:
    print_summary("rm", train_rm(cfg), cfg.output_dir, ("loss", "accuracy", "margin", "eval_accuracy", "eval_margin"),
                  what="reward model")
