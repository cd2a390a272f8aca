"""The demo's evidence: report.json (machine-readable) and report.md (for people), written side by side.

The report dict, as the demo pipeline builds it:

    {
      "stages": {                                  # in the order they ran; "sft" is the baseline
        "sft": {"accuracy": 0.52, "wall_time_s": 95.1},
        "dpo": {"accuracy": 0.91, "kl": 3.2, "reward_accuracy": 0.97, "wall_time_s": 120.4},
        ...
      },
      "baseline": "sft",                           # optional; default "sft" when present
      "metric": "accuracy",                        # optional: the stages' headline key (the smollm2 recipe's
                                                   # is "success"); a value between 0 and 1
      "columns": [["kl", "KL to reference"]],      # optional: the stage table's columns after the metric
      "required_gain": {"dpo": 0.30},              # optional: minimum accuracy gain over the baseline
      "teacher_gap": {"distill": {"teacher": "dpo", "max_gap": 0.10}},   # optional: student vs its teacher
      "no_drop": {"dpo": {"key": "fact", "baseline": "base"}},  # optional: a share that must not fall
      "samples": [{"prompt": "...", "reference": "...", "sft": "...", "dpo": "..."}],   # optional
      "plots": ["accuracy.png", "dpo/loss.png"],   # optional, relative to out_dir
      "settings": {...}, "total_wall_time_s": 301.0 # optional
    }
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from prefalign.errors import PrefalignError
from prefalign.train.plots import pyplot

# Stage columns after accuracy, in TRL-like names where one exists; missing values show as "-".
_COLUMNS = [("kl", "KL to reference"), ("reward_accuracy", "reward accuracy"), ("wall_time_s", "wall time (s)")]


def metric(report: dict[str, Any]) -> str:
    return report.get("metric", "accuracy")


def _check(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    stages = report.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise PrefalignError("report needs a non-empty 'stages' dict", "report")
    key = metric(report)
    for name, stage in stages.items():
        acc = stage.get(key) if isinstance(stage, dict) else None
        if not isinstance(acc, (int, float)) or not 0.0 <= acc <= 1.0:
            raise PrefalignError(f"stage {name!r} needs {key!r} between 0 and 1, got {acc!r}", "report")
    return stages


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else f"{v:.3f}"
    return str(v)


def _md_cell(text: Any) -> str:
    """Text safe inside a markdown table cell: pipes escaped, newlines shown as ⏎."""
    return str(text).replace("|", "\\|").replace("\n", " ⏎ ")


def gains(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per stage with a required gain: its gain over the baseline and whether it meets the requirement."""
    stages, key = _check(report), metric(report)
    baseline = report.get("baseline", "sft")
    out: dict[str, dict[str, Any]] = {}
    for name, need in (report.get("required_gain") or {}).items():
        if name not in stages or baseline not in stages:
            continue
        gain = stages[name][key] - stages[baseline][key]
        # rounding guard: a gain printed as 0.300 must not fail a 0.30 requirement through float noise
        out[name] = {"gain": gain, "required": need, "passed": gain >= need - 1e-9, "baseline": baseline}
    for name, spec in (report.get("teacher_gap") or {}).items():  # a student within max_gap of its teacher
        teacher = spec["teacher"]
        if name not in stages or teacher not in stages:
            continue
        gain = stages[name][key] - stages[teacher][key]
        out[name] = {"gain": gain, "required": -spec["max_gap"], "passed": gain >= -spec["max_gap"] - 1e-9,
                     "baseline": teacher}
    for name, spec in (report.get("no_drop") or {}).items():  # e.g. shorter answers that still name the fact
        share, base = spec["key"], spec["baseline"]
        if name not in stages or base not in stages:
            continue
        gain = stages[name][share] - stages[base][share]
        out[f"{name} {share}"] = {"gain": gain, "required": 0.0, "passed": gain >= -1e-9, "baseline": base}
    return out


QUICK_NOTE = "quick mode checks the machinery, not the accuracy targets (run without --quick for those)"


def verdict(report: dict[str, Any], check: dict[str, Any]) -> str:
    """PASS / FAIL of a required gain; a --quick run trains too little for the targets, so it says so instead."""
    if (report.get("settings") or {}).get("quick"):
        return "not checked (quick)"
    return "PASS" if check["passed"] else "FAIL"


def check_line(report: dict[str, Any], name: str, check: dict[str, Any]) -> str:
    """One check as the console and report.md print it, e.g. "PASS: dpo gains +0.343 over sft (needs >= +0.30)"."""
    return (f"{verdict(report, check)}: {name} gains {check['gain']:+.3f} over {check['baseline']} "
            f"(needs >= {check['required']:+.2f})")


def _stage_table(report: dict[str, Any]) -> list[str]:
    stages, key = _check(report), metric(report)
    columns = report.get("columns") or _COLUMNS
    baseline = report.get("baseline", "sft")
    base = stages.get(baseline, {}).get(key)
    head = ["stage", f"held-out {key}", f"gain over {baseline}"] + [label for _, label in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, stage in stages.items():
        gain = "-" if base is None or name == baseline else f"{stage[key] - base:+.3f}"
        cells = [name, f"{stage[key]:.3f}", gain] + [_fmt(stage.get(col)) for col, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _samples(report: dict[str, Any]) -> list[str]:
    samples = report.get("samples") or []
    if not samples:
        return []
    keys = [k for k in samples[0] if k != "prompt"]
    lines = ["## Sample generations (greedy, held-out prompts)", "", "| prompt | " + " | ".join(keys) + " |"]
    lines.append("|" + "---|" * (len(keys) + 1))
    for s in samples:
        lines.append("| " + " | ".join(_md_cell(s.get(k, "")) for k in ["prompt", *keys]) + " |")
    return lines + [""]


def render_markdown(report: dict[str, Any]) -> str:
    """report.md's text: stage table, requirement checks, samples, plots, settings."""
    lines = ["# prefalign demo report", ""]
    lines += _stage_table(report) + [""]
    checks = gains(report)
    if checks:
        lines += ["## Checks", ""]
        if (report.get("settings") or {}).get("quick"):
            lines += [f"The {QUICK_NOTE}.", ""]
        for name, c in checks.items():
            lines.append(f"- {check_line(report, name, c)}")
        lines.append("")
    lines += _samples(report)
    plots = report.get("plots") or []
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).as_posix()}]({Path(p).as_posix()})" for p in plots] + [""]
    if "total_wall_time_s" in report:
        lines += [f"Total wall time: {report['total_wall_time_s']:.1f} s", ""]
    if report.get("settings"):
        lines += ["## Settings", "", "```json", json.dumps(report["settings"], indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def write_report(out_dir: str | Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """Write out_dir/report.json and out_dir/report.md; returns (json_path, md_path)."""
    _check(report)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    full = dict(report)
    checks = gains(report)
    if checks:
        full["checks"] = checks
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(render_markdown(report), encoding="utf-8")
    return json_path, md_path


def plot_stage_accuracy(stages: dict[str, float], out_png: str | Path, label: str = "accuracy") -> Path:
    """Bar chart of a held-out share per stage (e.g. accuracy {"sft": 0.48, "dpo": 0.86}), values on the bars."""
    if not stages:
        raise PrefalignError("no stages to plot", "plot_stage_accuracy")
    plt = pyplot()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    names, values = list(stages), [float(v) for v in stages.values()]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 4), dpi=100)
    bars = ax.bar(names, values, color=["tab:gray"] + ["tab:green"] * (len(names) - 1))
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, v + 0.02, f"{v:.0%}", ha="center", va="bottom")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(f"held-out {label}")
    ax.set_title(f"Held-out {label} by stage")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
