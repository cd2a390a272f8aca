"""`prefalign ppo`: PPO with a reward model, a value model and GAE."""

from __future__ import annotations

from prefalign.config import PPOConfig
from prefalign.stages.ppo import train_ppo
from prefalign.train.setup import print_summary


def run_command(cfg: PPOConfig) -> None:
    print_summary("ppo", train_ppo(cfg), cfg.output_dir, ("objective/scores", "objective/kl", "policy/approxkl_avg", "loss/value_avg"))
