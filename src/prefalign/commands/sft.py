"""`prefalign sft`: supervised fine-tuning on conversations, prompt/completion or text."""

from __future__ import annotations

from prefalign.config import SFTConfig
from prefalign.stages.causal_lm import SHOWN, train_sft
from prefalign.train.setup import print_summary


def run_command(cfg: SFTConfig) -> None:
    print_summary("sft", train_sft(cfg), cfg.output_dir, SHOWN)
