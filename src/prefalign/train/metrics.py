"""Metric accumulation and sinks: metrics.jsonl (one JSON object per line with a `step` key), the progress bar,
and TensorBoard / W&B through Accelerate's trackers."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prefalign.errors import PrefalignError


@dataclass(frozen=True)
class Extreme:
    """A metric that combines over micro-batches and processes by its min or max instead of a mean (TRL's
    clip_ratio/low_min, clip_ratio/high_max). A non-finite value means "none here" and is ignored."""

    kind: str  # "min" or "max"
    value: float


# A stage's step returns {name: (sum, count)}, the mean over micro-batches and processes being sum / count, or
# {name: Extreme(...)} for a min / max.
MetricSums = dict[str, "tuple[float, float] | Extreme"]


def human(n: float) -> str:
    """A count for people: 1234 -> '1.2K', 1.3e6 -> '1.3M', 42 -> '42'."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suffix}"
    return f"{n:.0f}" if abs(n) >= 10 or float(n).is_integer() else f"{n:.1f}"


def to_host(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar tensors as Python floats with one device-to-host transfer (a float() each would sync each)."""
    if not values:
        return {}
    host = torch.stack([v.detach().double().reshape(()) for v in values.values()]).tolist()
    return dict(zip(values, host))


class MetricAccumulator:
    """Sums metric (sum, count) pairs and keeps the min / max of `Extreme` ones over micro-batches, then reduces
    both across processes."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self.extremes: dict[str, Extreme] = {}

    def add(self, metrics: MetricSums) -> None:
        for name, value in metrics.items():
            if isinstance(value, Extreme):
                self._add_extreme(name, value)
                continue
            total, count = value
            entry = self.sums[name]
            entry[0] += float(total)
            entry[1] += float(count)

    def _add_extreme(self, name: str, value: Extreme) -> None:
        pick = min if value.kind == "min" else max
        identity = math.inf if value.kind == "min" else -math.inf
        current = self.extremes.get(name, Extreme(value.kind, identity)).value
        new = value.value if math.isfinite(value.value) else identity
        self.extremes[name] = Extreme(value.kind, pick(current, new))

    def means(self) -> dict[str, float]:
        """This process's means and extremes (no reduction across processes)."""
        out = {n: (s / c if c else math.nan) for n, (s, c) in self.sums.items()}
        out.update({n: e.value if math.isfinite(e.value) else math.nan for n, e in self.extremes.items()})
        return out

    def reduce(self, accelerator: Any) -> dict[str, float]:
        out: dict[str, float] = {}
        names = sorted(self.sums)
        if names:
            local = torch.tensor([self.sums[n] for n in names], dtype=torch.float64, device=accelerator.device)
            if accelerator.num_processes > 1:
                local = accelerator.reduce(local, reduction="sum")
            out.update({n: (s / c if c else math.nan) for n, (s, c) in zip(names, local.tolist())})
        extremes = sorted(self.extremes)
        if extremes:
            # one MAX all-reduce for both kinds: a min is the max of the negated values
            sign = [-1.0 if self.extremes[n].kind == "min" else 1.0 for n in extremes]
            local = torch.tensor([s * self.extremes[n].value for s, n in zip(sign, extremes)], dtype=torch.float64,
                                 device=accelerator.device)
            if accelerator.num_processes > 1:
                torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MAX)
            for s, n, v in zip(sign, extremes, local.tolist()):
                out[n] = s * v if math.isfinite(v) else math.nan
        return out


class MetricsLog:
    """Appends to output_dir/metrics.jsonl (a resumed run continues the same file) and forwards to trackers."""

    def __init__(self, output_dir: str | Path, accelerator: Any, resume_step: int | None = None) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        if accelerator.is_main_process and resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        """Drop entries logged after the checkpoint we resume from, so the file reads as one uninterrupted run."""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        self.path.write_text("".join(k + "\n" for k in kept))

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"step": step, **{k: _clean(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)


def _clean(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float):
        return round(v, 8) if math.isfinite(v) else None
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
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

