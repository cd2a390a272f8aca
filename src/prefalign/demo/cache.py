"""What makes a demo rerun cheap: a step whose output exists (with its recorded wall time) is skipped."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefalign.train.setup import is_finished


def is_done(target: Path) -> bool:
    """A step is finished when its final model (or tokenizer, or data file) was saved; trainers move the files in
    atomically, and so do the demo's data writers."""
    if target.suffix == ".jsonl":
        return target.is_file()
    return is_finished(target, "tokenizer" if target.name == "tokenizer" else "model")


def timed_step(times: dict[str, float], name: str, run: Callable[[], Any], target: Path) -> None:
    """Run a step unless its model (or data file `target`) exists; its wall time goes into `times` and is kept
    beside the output for reruns."""
    timing = target.with_suffix(".time.json") if target.suffix == ".jsonl" else target / "demo_time.json"
    if is_done(target) and timing.is_file():
        print(f"[demo] {name}: done already ({target}), skipped")
        times[name] = json.loads(timing.read_text())["wall_time_s"]
        return
    print(f"[demo] {name} ...", flush=True)
    start = time.perf_counter()
    run()
    times[name] = time.perf_counter() - start
    timing.write_text(json.dumps({"wall_time_s": times[name]}) + "\n")
