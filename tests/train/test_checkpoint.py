"""Checkpoints are complete or absent; `latest` never picks a half-written one; rotation keeps the newest."""

from __future__ import annotations

import json

import pytest
import torch

from prefalign.errors import PrefalignError
from prefalign.train.checkpoint import (
    TrainState,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)


def _opt():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    p.grad = torch.ones(3)
    opt.step()
    sched.step()
    return p, opt, sched


def _save_weights(d):
    (d / "model.safetensors").write_bytes(b"x")


def test_save_and_load_roundtrip(tmp_path):
    _, opt, sched = _opt()
    state = TrainState(global_step=3, epoch=1, micro_index=2, total_steps=10)
    torch.manual_seed(123)
    path = save_checkpoint(tmp_path, state, _save_weights, opt.state_dict(), sched)
    expected_next = torch.rand(1)
    assert path.name == "checkpoint-3" and (path / "trainer_state.json").is_file()
    p2, opt2, sched2 = _opt()
    torch.manual_seed(999)
    loaded, raw = load_checkpoint(path, torch.nn.ParameterList([p2]), opt2, sched2)
    assert loaded == state and raw["micro_index"] == 2
    assert torch.equal(torch.rand(1), expected_next)  # RNG restored: the next draw is the same
    assert sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"]


def test_crash_mid_write_leaves_no_checkpoint_for_latest(tmp_path):
    _, opt, sched = _opt()
    save_checkpoint(tmp_path, TrainState(global_step=2), _save_weights, opt.state_dict(), sched)

    def crash(d):
        (d / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, TrainState(global_step=4), crash, opt.state_dict(), sched)
    # The half-written one sits in a hidden temp dir and is not a checkpoint.
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert resolve_checkpoint("latest", tmp_path).name == "checkpoint-2"
    # A directory named like a checkpoint but without trainer_state.json is ignored too.
    (tmp_path / "checkpoint-9").mkdir()
    assert resolve_checkpoint("latest", tmp_path).name == "checkpoint-2"


def test_rotation_and_errors(tmp_path):
    _, opt, sched = _opt()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, TrainState(global_step=step), _save_weights, opt.state_dict(), sched, save_total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    assert json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    with pytest.raises(PrefalignError, match="no checkpoint found"):
        resolve_checkpoint("latest", tmp_path / "empty")
    with pytest.raises(PrefalignError, match="not a complete checkpoint"):
        resolve_checkpoint(str(tmp_path / "nope"), tmp_path)
