"""Checkpoints are complete or absent, hold no pickle, and say what is wrong with them.

A checkpoint is written into a hidden temporary directory beside its final place and renamed into
`checkpoint-STEP` only when every file is on disk (`train.files`), so a crash at any moment leaves either the previous
set of checkpoints or the new one. `trainer_state.json` is written last: it marks a directory as a checkpoint and
records the size of every other file, so a file truncated or replaced afterwards is caught before anything loads.
Optimizer, scheduler and RNG states are safetensors files (`train.tensorstate`): loading one runs no code from it.
The run's config is kept in each checkpoint (`prefalign_config.json`), so a resume can compare it with the new one.

`latest` is the newest checkpoint that passes those checks; each one it skips is named with the reason.
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
from safetensors import SafetensorError, safe_open

from prefalign.errors import PrefalignError
from prefalign.train.distributed import load_optimizer_state
from prefalign.train.files import drop_retired, publish_dir, staged, staging_dir
from prefalign.train.tensorstate import StateFileError, load_state, save_state

STATE_FILE = "trainer_state.json"
CONFIG_FILE = "prefalign_config.json"
OPTIMIZER, SCHEDULER, RNG = "optimizer.safetensors", "scheduler.safetensors", "rng_state.safetensors"
_PICKLES = ("optimizer.pt", "scheduler.pt", "rng_state.pt")  # what versions before safetensors state wrote
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
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


def _numbered(root: Path) -> list[Path]:
    """Every `checkpoint-N` directory, complete or not, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints that were published (they hold trainer_state.json), oldest first."""
    return [p for p in _numbered(Path(output_dir)) if (p / STATE_FILE).is_file()]


def checkpoint_problem(path: Path) -> tuple[Path, str] | None:
    """(file, what is wrong with it) when `path` cannot be resumed from; None when it is complete and readable."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        return path, f"incomplete (no {STATE_FILE})"
    try:
        raw = json.loads(state_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return state_file, f"unreadable (not JSON: {e})"
    if not isinstance(raw, dict) or not isinstance(raw.get("global_step"), int):
        return state_file, "not a prefalign train state (no global_step)"
    pickled = [n for n in _PICKLES if (path / n).exists()]
    if pickled and not (path / OPTIMIZER).exists():
        return path / pickled[0], ("a pickle (written before prefalign stored checkpoint state as safetensors); "
                                   "pickles can run code when loaded, so it is not read")
    for name, size in (raw.get("files") or {}).items():
        f = path / name
        if not f.is_file():
            return f, "missing"
        if f.stat().st_size != size:
            actual = f.stat().st_size
            return f, f"truncated ({actual} of {size} bytes)" if actual < size else f"changed ({actual}, not {size} bytes)"
    if not any((path / w).is_file() for w in WEIGHTS):
        return path, f"no model weights ({' or '.join(WEIGHTS[::2])})"
    for name in (OPTIMIZER, SCHEDULER, RNG):
        if not (path / name).is_file():
            return path / name, "missing"
    for f in sorted(path.rglob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except SafetensorError as e:
            return f, f"unreadable ({e})"
    return None


def resolve_checkpoint(spec: str, output_dir: str | Path, note: Callable[[str], None] = print) -> Path:
    """`latest` → the newest checkpoint in output_dir that is complete and readable (each one skipped is named
    through `note`); otherwise the checkpoint directory `spec`, which must be complete. One-line errors."""
    if spec != "latest":
        path = Path(spec)
        if not path.exists():
            raise PrefalignError("does not exist", f"--resume_from_checkpoint {spec}")
        if not path.is_dir():
            raise PrefalignError("is not a checkpoint directory", f"--resume_from_checkpoint {spec}")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise PrefalignError(f"cannot resume: {problem[1]}", str(problem[0]))
        return path
    root = Path(output_dir)
    skipped = []
    for path in reversed(_numbered(root)):
        problem = checkpoint_problem(path)
        if problem is None:
            for line in skipped:
                note(f"--resume_from_checkpoint latest: skipping {line}")
            return path
        file = f"{problem[0].relative_to(path)}: " if problem[0] != path else ""
        skipped.append(f"{path.name} ({file}{problem[1]})")
    if skipped:
        raise PrefalignError(f"no complete checkpoint in {root}: {'; '.join(skipped)}", "--resume_from_checkpoint latest")
    why = "" if root.is_dir() else " (the directory does not exist)"
    raise PrefalignError(f"no checkpoint found in {root}{why}", "--resume_from_checkpoint latest")


def resume_advice(output_dir: str | Path) -> str:
    """What a user can do next with what is in output_dir: resume only when a resume can work."""
    for path in reversed(_numbered(Path(output_dir))):
        if checkpoint_problem(path) is None:
            return f"the latest complete checkpoint is {path.name}: resume with --resume_from_checkpoint latest"
    return ("no checkpoint was written: start again with --overwrite_output_dir (or another --output_dir)")


def save_checkpoint(
    output_dir: str | Path,
    state: TrainState,
    save_model: Callable[[Path], None],
    optimizer_state: dict[str, Any],
    scheduler: Any,
    extra: dict[str, Any] | None = None,
    save_total_limit: int | None = None,
    main: bool = True,
    config: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint-STEP atomically and prune old ones beyond `save_total_limit` (0 or None: keep all).

    Every process calls this (`save_model` may gather sharded weights, a collective); only `main` writes. A failed or
    interrupted save leaves no trace; a full disk is one PrefalignError naming the checkpoint."""
    root = Path(output_dir)
    final = root / f"checkpoint-{state.global_step}"
    tmp = staging_dir(root, final.name, main)
    try:
        with staged(tmp, str(final), main):
            save_model(tmp)
            if not main:
                return final
            save_state(optimizer_state, tmp / OPTIMIZER)
            save_state(scheduler.state_dict(), tmp / SCHEDULER)
            save_state(rng_state(), tmp / RNG)
            if config is not None:
                (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            (tmp / STATE_FILE).write_text(json.dumps({**asdict(state), **(extra or {}), "files": files}, indent=2))
            publish_dir(tmp, final)  # the same step saved again (Ctrl-C right after a save) is replaced whole
    except PrefalignError as e:
        raise PrefalignError(f"{e.reason}; {resume_advice(root)}", e.where) from None
    drop_retired(root)  # the run this one overwrote is no longer needed: this one has a checkpoint
    if save_total_limit and save_total_limit > 0:
        for stale in list_checkpoints(root)[:-save_total_limit]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _state(path: Path) -> Any:
    try:
        return load_state(path)
    except StateFileError as e:
        raise PrefalignError(f"cannot resume: {e}", str(path)) from None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    restore_optimizer: Callable[[dict[str, Any]], None] | None = None,
                    ) -> tuple[TrainState, dict[str, Any]]:
    """Restore optimizer (`restore_optimizer`, default: into `optimizer` of `model`), scheduler and RNG; return the
    train state and the raw state dict (model is loaded by caller)."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise PrefalignError(f"cannot resume: {problem[1]}", str(problem[0]))
    raw = json.loads((path / STATE_FILE).read_text())
    restore_optimizer = restore_optimizer or (lambda s: load_optimizer_state(model, optimizer, s))
    for name, restore in ((OPTIMIZER, restore_optimizer),
                          (SCHEDULER, scheduler.load_state_dict), (RNG, set_rng_state)):
        state = _state(path / name)
        try:
            restore(state)
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
            raise PrefalignError(f"does not fit this run ({_first_line(e)}); was it written by another model or "
                                 "command?", str(path / name)) from None
    fields = TrainState.__dataclass_fields__
    return TrainState(**{k: v for k, v in raw.items() if k in fields}), raw


def load_checkpoint_weights(load_model: Callable[[Path], None], path: Path) -> None:
    """`load_model(path)` with a one-line error naming the weights file when they do not fit the model."""
    try:
        load_model(path)
    except (RuntimeError, ValueError, KeyError, SafetensorError) as e:
        weights = next((path / w for w in WEIGHTS if (path / w).is_file()), path)
        raise PrefalignError(f"does not fit this model ({_first_line(e)}); was it written by another model?",
                             str(weights)) from None


def save_after_interrupt(save: Callable[[], Path], step: int, output_dir: str | Path, cause: str,
                         note: Callable[[str], None]) -> None:
    """After Ctrl-C or SIGTERM: save a resumable checkpoint at `step`, or say why none was; an interrupt during
    the save abandons it (its temporary directory is removed) and says what is left to resume from."""
    done = Path(output_dir) / f"checkpoint-{step}"
    if step == 0:
        note(f"\nInterrupted ({cause}) before the first optimizer step: nothing to save")
        return
    if checkpoint_problem(done) is None:
        note(f"\nInterrupted ({cause}) at step {step}, which {done.name} already holds: resume with "
             "--resume_from_checkpoint latest")
        return
    note(f"\nInterrupted ({cause}): saving a resumable checkpoint at step {step} (interrupt again to abandon it) ...")
    try:
        path = save()
    except KeyboardInterrupt:
        note(f"Interrupted again: {done.name} was abandoned and removed; {resume_advice(output_dir)}")
        return
    note(f"Saved {path}: resume with --resume_from_checkpoint latest")


def _first_line(e: BaseException) -> str:
    """The telling line of an error: torch's load_state_dict puts "Error(s) in loading..." first and the first
    "size mismatch for NAME: ..." after it."""
    lines = [line.strip() for line in (str(e).strip() or type(e).__name__).splitlines() if line.strip()]
    telling = next((line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))),
                   lines[0])
    return telling[:300]
