"""`prefalign demo`: the whole alignment pipeline on a built-in task, with evaluation, plots and a report."""

from __future__ import annotations

from prefalign.config import DemoConfig
from prefalign.demo.pipeline import run_demo


def run_command(cfg: DemoConfig) -> None:
    run_demo(cfg)
