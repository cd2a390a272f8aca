"""PNG plots of a run's metrics.jsonl and of the demo's accuracy per stage (matplotlib, Agg backend, no display).

metrics.jsonl holds one JSON object per line with a `step`; evaluation entries carry the same names prefixed with
`eval_` (TRL's convention: `loss` / `eval_loss`, `rewards/margins` / `eval_rewards/margins`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefalign.errors import PrefalignError

# Metrics plotted when present, with the file each one goes to.
PLOTTED = {
    "loss": "loss.png",
    "rewards/margins": "rewards_margins.png",
    "rewards/accuracies": "rewards_accuracies.png",
}


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (works without a display); a clear error when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as e:  # an optional dependency: pip install 'prefalign[plot]'
        raise PrefalignError("plots need matplotlib: pip install 'prefalign[plot]'", "plots") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def read_metrics_file(path: str | Path) -> list[dict[str, Any]]:
    """Parse metrics.jsonl; a missing or empty file, or a line that is not a JSON object with a step, is an error."""
    path = Path(path)
    if not path.is_file():
        raise PrefalignError("no metrics.jsonl: was the run trained with this output_dir?", str(path))
    records: list[dict[str, Any]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrefalignError(f"not valid JSON ({e.msg})", f"{path}:{lineno}") from e
        if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)):
            raise PrefalignError("a metrics line must be a JSON object with a numeric 'step'", f"{path}:{lineno}")
        records.append(record)
    if not records:
        raise PrefalignError("metrics.jsonl is empty: nothing was logged", str(path))
    return records


def _series(records: list[dict[str, Any]], name: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric, skipping entries where it is absent or not a finite number."""
    steps, values = [], []
    for r in records:
        v = r.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            steps.append(float(r["step"]))
            values.append(float(v))
    return steps, values


def _plot_metric(records: list[dict[str, Any]], name: str, out_png: Path) -> bool:
    """One metric against step, train as a line and eval as markers; False when neither was logged."""
    train = _series(records, name)
    evals = _series(records, f"eval_{name}")
    if not train[0] and not evals[0]:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train[0]:
        ax.plot(*train, label=f"train {name}", color="tab:blue", linewidth=1.5)
    if evals[0]:
        ax.plot(*evals, "o--", label=f"eval {name}", color="tab:orange", markersize=5)
    if name == "rewards/accuracies":
        ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    ax.set_title(name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return True


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write loss / rewards-margins / rewards-accuracies PNGs of `run_dir`'s metrics.jsonl into `run_dir`.

    Metrics the run did not log (an SFT run has no rewards) are skipped; returns the files written.
    """
    run_dir = Path(run_dir)
    records = read_metrics_file(run_dir / "metrics.jsonl")
    written = []
    for name, filename in PLOTTED.items():
        out = run_dir / filename
        if _plot_metric(records, name, out):
            written.append(out)
    return written


def plot_stage_accuracy(stages: dict[str, float], out_png: str | Path) -> Path:
    """Bar chart of held-out accuracy per stage (e.g. {"sft": 0.48, "dpo": 0.86}), values printed on the bars."""
    if not stages:
        raise PrefalignError("no stages to plot", "plot_stage_accuracy")
    plt = _pyplot()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    names, values = list(stages), [float(v) for v in stages.values()]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 4), dpi=100)
    bars = ax.bar(names, values, color=["tab:gray"] + ["tab:green"] * (len(names) - 1))
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, v + 0.02, f"{v:.0%}", ha="center", va="bottom")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Held-out accuracy by stage")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


# ---------------------------------------------------------------------------------------------- `prefalign plot`


@dataclass
class PlotConfig:
    """Configuration of `prefalign plot`."""

    run_dir: str | None = None
    """Run directory holding metrics.jsonl (the output_dir of any training command); the PNGs are written there."""


CONFIG = PlotConfig
POSITIONAL = "run_dir"  # `prefalign plot RUN_DIR`


def run_command(cfg: PlotConfig) -> None:
    """`prefalign plot RUN_DIR`."""
    if not cfg.run_dir:
        raise PrefalignError("give the run directory: prefalign plot RUN_DIR", "--run_dir")
    if not Path(cfg.run_dir).is_dir():
        raise PrefalignError("no such run directory", f"--run_dir {cfg.run_dir}")
    written = plot_run(cfg.run_dir)
    if not written:
        raise PrefalignError(f"none of {', '.join(PLOTTED)} was logged in metrics.jsonl", cfg.run_dir)
    for path in written:
        print(f"plot: wrote {path}")
