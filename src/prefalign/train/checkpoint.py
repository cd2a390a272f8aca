"""Checkpoints are complete or absent.

A checkpoint is written into a hidden temporary directory beside its final place and renamed into
`checkpoint-STEP` only when every file is on disk (`train.files`), so a crash at any moment leaves either the previous set of
checkpoints or the new one, never a half-written directory that `latest` could pick. `trainer_state.json` is
written last inside the temporary directory and is what marks a directory as a checkpoint.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefalign.errors import PrefalignError
from prefalign.train.distributed import load_optimizer_state
from prefalign.train.files import publish_dir, staging_dir

STATE_FILE = "trainer_state.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainState:
    """Where training stands: enough to continue exactly."""

    global_step: int = 0
    epoch: int = 0
    micro_index: int = 0  # micro-batches of `epoch` already consumed
    total_steps: int = 0


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(spec: str, output_dir: str | Path) -> Path:
    """`latest` → newest complete checkpoint in output_dir; otherwise a checkpoint directory path."""
    if spec == "latest":
        ckpts = list_checkpoints(output_dir)
        if not ckpts:
            raise PrefalignError(f"no checkpoint found in {output_dir}", "--resume_from_checkpoint latest")
        return ckpts[-1]
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise PrefalignError(f"not a complete checkpoint (no {STATE_FILE})", f"--resume_from_checkpoint {spec}")
    return path


def save_checkpoint(
    output_dir: str | Path,
    state: TrainState,
    save_model: Callable[[Path], None],
    optimizer_state: dict[str, Any],
    scheduler: Any,
    extra: dict[str, Any] | None = None,
    save_total_limit: int | None = None,
    main: bool = True,
) -> Path:
    """Write checkpoint-STEP atomically and prune old ones beyond `save_total_limit`.

    Every process calls this (`save_model` may gather sharded weights, a collective); only `main` writes."""
    root = Path(output_dir)
    final = root / f"checkpoint-{state.global_step}"
    tmp = staging_dir(root, f"checkpoint-{state.global_step}", main)
    save_model(tmp)
    if not main:
        return final
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng_state.pt")
    payload = {**asdict(state), **(extra or {})}
    (tmp / STATE_FILE).write_text(json.dumps(payload, indent=2))
    publish_dir(tmp, final)  # the same step saved again (Ctrl-C right after a save) is replaced whole
    if save_total_limit:
        for stale in list_checkpoints(root)[:-save_total_limit]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> tuple[TrainState, dict[str, Any]]:
    """Restore optimizer, scheduler and RNG; return the train state and the raw state dict (model is loaded by caller)."""
    raw = json.loads((path / STATE_FILE).read_text())
    load_optimizer_state(model, optimizer, torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng_state.pt", weights_only=False))
    fields = TrainState.__dataclass_fields__
    return TrainState(**{k: v for k, v in raw.items() if k in fields}), raw
