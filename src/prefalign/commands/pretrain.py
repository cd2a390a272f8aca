"""`prefalign pretrain`: causal-LM pretraining on raw text, packed into blocks."""

from __future__ import annotations

from prefalign.config import PretrainConfig
from prefalign.stages.causal_lm import SHOWN, train_pretrain
from prefalign.train.setup import print_summary


def run_command(cfg: PretrainConfig) -> None:
    print_summary("pretrain", train_pretrain(cfg), cfg.output_dir, SHOWN)
