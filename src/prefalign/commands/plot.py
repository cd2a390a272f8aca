"""`prefalign plot RUN_DIR`: PNG plots of a run's metrics.jsonl, written beside it."""

from __future__ import annotations

from pathlib import Path

from prefalign.config import PlotConfig
from prefalign.errors import PrefalignError
from prefalign.train.plots import PLOTTED, plot_run


def run_command(cfg: PlotConfig) -> None:
    if not cfg.run_dir:
        raise PrefalignError("give the run directory: prefalign plot RUN_DIR", "--run_dir")
    if not Path(cfg.run_dir).is_dir():
        raise PrefalignError("no such run directory", f"--run_dir {cfg.run_dir}")
    written = plot_run(cfg.run_dir)
    if not written:
        raise PrefalignError(f"none of {', '.join(PLOTTED)} was logged in metrics.jsonl", cfg.run_dir)
    for path in written:
        print(f"plot: wrote {path}")
