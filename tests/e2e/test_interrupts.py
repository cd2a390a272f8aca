"""Preemption on a real `prefalign dpo` process: SIGTERM saves a resumable checkpoint as Ctrl-C does, and a SIGKILL
in the middle of a checkpoint save never leaves something `latest` would pick but cannot load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import conv, write_jsonl
from prefalign.cli import main
from prefalign.train.checkpoint import checkpoint_problem, resolve_checkpoint
from prefalign.train.metrics import read_metrics

pytestmark = pytest.mark.slow
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src"), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    rows = [{"prompt": conv(("user", f"what is {i} + 1")), "chosen": conv(("assistant", f"{i + 1}")),
             "rejected": conv(("assistant", f"{i + 2}"))} for i in range(16)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", rows)


def _argv(model, data, out, *extra) -> list[str]:
    return [sys.executable, "-m", "prefalign.cli", "dpo", "--model_name_or_path", str(model), "--dataset_name",
            str(data), "--output_dir", str(out), "--logging_steps", "1", "--per_device_train_batch_size", "2",
            "--disable_tqdm", *map(str, extra)]


def _wait_for(condition, timeout: float = 180.0, every: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(every)
    return False


def _logged(out: Path, n: int) -> bool:
    return (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= n


def test_sigterm_saves_a_resumable_checkpoint(tiny_model_dir, pairs, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_argv(tiny_model_dir, pairs, out, "--max_steps", 400, "--save_steps", 0), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: _logged(out, 2))
    proc.send_signal(signal.SIGTERM)
    said, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    ckpt = resolve_checkpoint("latest", out)
    step = json.loads((ckpt / "trainer_state.json").read_text())["global_step"]
    assert f"Interrupted (SIGTERM): saving a resumable checkpoint at step {step}" in said
    assert f"Saved {ckpt}: resume with --resume_from_checkpoint latest" in said
    assert main(_argv(tiny_model_dir, pairs, out, "--max_steps", step + 2, "--save_steps", 0,
                      "--resume_from_checkpoint", "latest")[3:]) == 0  # in-process: one interpreter start less
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")][-3:] == [step, step + 1, step + 2]


def test_kill_during_a_checkpoint_save_leaves_latest_loadable(tiny_model_dir, pairs, tmp_path):
    """SIGKILL (no handler can run) while a `.tmp-checkpoint-*` directory is being written; up to four tries, each
    checked to have really hit a save in progress."""
    for attempt in range(4):
        out = tmp_path / f"run{attempt}"
        proc = subprocess.Popen(_argv(tiny_model_dir, pairs, out, "--max_steps", 400, "--save_steps", 1), env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def saving(out=out) -> bool:
            return out.is_dir() and any(p.name.startswith(".tmp-checkpoint-") for p in out.iterdir()) \
                and _logged(out, 2)

        hit = _wait_for(saving, every=0.001)
        proc.kill()
        proc.wait(timeout=60)
        if hit and any(p.name.startswith(".tmp-checkpoint-") for p in out.iterdir()):
            break
    else:
        pytest.fail("never caught a save in progress in four tries")
    ckpt = resolve_checkpoint("latest", out)
    assert checkpoint_problem(ckpt) is None
    step = json.loads((ckpt / "trainer_state.json").read_text())["global_step"]
    assert main(_argv(tiny_model_dir, pairs, out, "--max_steps", step + 1, "--save_steps", 0,
                      "--resume_from_checkpoint", "latest")[3:]) == 0
    assert not [p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".old-"))]  # the leftover was cleared
