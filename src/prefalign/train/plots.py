"""PNG plots of a run's metrics.jsonl (matplotlib, Agg backend, no display).

metrics.jsonl holds one JSON object per line with a `step`; evaluation entries carry the same names prefixed with
`eval_` (TRL's convention: `loss` / `eval_loss`, `rewards/margins` / `eval_rewards/margins`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from prefalign.errors import PrefalignError
from prefalign.train.metrics import read_metrics

# Metrics plotted when present, with the file each one goes to.
PLOTTED = {
    "loss": "loss.png",
    "rewards/margins": "rewards_margins.png",
    "rewards/accuracies": "rewards_accuracies.png",
}


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (works without a display); a clear error when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as e:  # an optional dependency: pip install 'prefalign[plot]'
        raise PrefalignError("plots need matplotlib: pip install 'prefalign[plot]'", "plots") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


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
    plt = pyplot()
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
    records = read_metrics(run_dir / "metrics.jsonl")
    written = []
    for name, filename in PLOTTED.items():
        out = run_dir / filename
        if _plot_metric(records, name, out):
            written.append(out)
    return written


