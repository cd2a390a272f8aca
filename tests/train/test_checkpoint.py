"""Checkpoints are complete or absent, hold no pickle, round-trip every optimizer / schedule / RNG state exactly,
and every damaged one is named in one line; `latest` skips what it cannot load, saying so. Also --optim: fused
AdamW or torch's loop, the same update, and a run resumed from either keeps its own."""

from __future__ import annotations

import gc
import json
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from prefalign.config import TrainArgs, field_help
from prefalign.config.checks import SCHEDULERS, check_train_args
from prefalign.errors import PrefalignError
from prefalign.train import distributed
from prefalign.train.checkpoint import (
    OPTIMIZER,
    TrainState,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_after_interrupt,
    save_checkpoint,
)
from prefalign.train.files import remove_stale
from prefalign.train.optim import build_optimizer, build_scheduler
from prefalign.train.tensorstate import load_state


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 3))


def _weights(model):
    def save(d: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    return save


def _train(model, opt, sched, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(5, 4, generator=g)).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def _same(a, b) -> None:
    """Exact equality of nested states: tensors bit for bit, tuples stay tuples, dict keys keep their types."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b or (a != a and b != b)


def _ckpt(tmp_path, step=2, **kw):
    model = _model()
    args = TrainArgs(output_dir=str(tmp_path), weight_decay=0.1)
    opt = build_optimizer(model, args)
    sched = build_scheduler(opt, args, 10)
    _train(model, opt, sched, step)
    return save_checkpoint(tmp_path, TrainState(global_step=step, total_steps=10), _weights(model), opt.state_dict(),
                           sched, **kw)


@pytest.mark.parametrize("schedule", SCHEDULERS)
def test_every_schedule_and_adamw_with_param_groups_round_trip_exactly(tmp_path, schedule):
    args = TrainArgs(output_dir=str(tmp_path), lr_scheduler_type=schedule, warmup_steps=2, weight_decay=0.1,
                     min_lr_rate=0.2)
    model = _model()
    opt, total = build_optimizer(model, args), 8
    sched = build_scheduler(opt, args, total)
    assert len(opt.param_groups) == 2  # decayed weights and undecayed biases / norms
    _train(model, opt, sched, 3)
    path = save_checkpoint(tmp_path, TrainState(global_step=3, total_steps=total), _weights(model), opt.state_dict(),
                           sched)
    assert {f.suffix for f in path.iterdir()} == {".safetensors", ".json"}  # nothing pickled

    fresh = _model()
    fresh.load_state_dict(model.state_dict())
    opt2 = build_optimizer(fresh, args)
    sched2 = build_scheduler(opt2, args, total)
    state, _ = load_checkpoint(path, fresh, opt2, sched2)
    assert state == TrainState(global_step=3, total_steps=total)
    _same(opt2.state_dict(), opt.state_dict())
    _same(sched2.state_dict(), sched.state_dict())
    _train(model, opt, sched, 3, seed=2)  # both continue identically
    _train(fresh, opt2, sched2, 3, seed=2)
    assert sched.get_last_lr() == sched2.get_last_lr()
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_rng_states_round_trip(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    path = save_checkpoint(tmp_path, TrainState(global_step=3), _weights(model), opt.state_dict(), sched)
    draws = (random.random(), float(np.random.randn()), float(torch.rand(1)))
    random.seed(2)
    np.random.seed(2)
    torch.manual_seed(2)
    load_checkpoint(path, model, opt, sched)
    assert (random.random(), float(np.random.randn()), float(torch.rand(1))) == draws


def test_fsdp_full_optimizer_state_round_trips(tmp_path):
    """The sharded path of train.distributed (full optimizer state keyed by parameter name) through the same files,
    on a one-process gloo group with FSDP2 (what the multi-process CPU tests run)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))

        def sharded():
            m = _model()
            fully_shard(m[0], mesh=mesh)
            fully_shard(m, mesh=mesh)
            return m

        args = TrainArgs(output_dir=str(tmp_path), weight_decay=0.1, lr_scheduler_type="cosine_with_min_lr",
                         warmup_steps=1)
        model = sharded()
        opt = build_optimizer(model, args)
        sched = build_scheduler(opt, args, 6)
        _train(model, opt, sched, 2)
        full = distributed.optimizer_state(model, opt)
        assert isinstance(next(iter(full["state"])), str)  # keyed by parameter name, not index
        path = save_checkpoint(tmp_path, TrainState(global_step=2), lambda d: _weights(_model())(d), full, sched)
        model2 = sharded()
        model2.load_state_dict(model.state_dict())
        opt2 = build_optimizer(model2, args)
        sched2 = build_scheduler(opt2, args, 6)
        _same(load_state(path / OPTIMIZER), full)  # exactly what was saved (tuples, name keys, tensors)
        load_checkpoint(path, model2, opt2, sched2)
        _train(model, opt, sched, 2, seed=3)
        _train(model2, opt2, sched2, 2, seed=3)
        for a, b in zip(model.parameters(), model2.parameters()):
            assert torch.equal(a.full_tensor(), b.full_tensor())
    finally:
        torch.distributed.destroy_process_group()


class _Payload:
    """What an attacker's pickle does when loaded: here, only create a file that proves it ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_carrying_a_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    path = _ckpt(tmp_path / "run")
    # an older checkpoint layout (optimizer.pt, ...) whose optimizer file runs code when unpickled
    for name in ("optimizer", "scheduler", "rng_state"):
        (path / f"{name}.safetensors").unlink()
        (path / f"{name}.pt").write_bytes(pickle.dumps(_Payload(marker)))
    state = json.loads((path / "trainer_state.json").read_text())
    state.pop("files")
    (path / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(PrefalignError, match=r"optimizer\.pt: cannot resume: a pickle .* not read"):
        resolve_checkpoint(str(path), path.parent)
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(PrefalignError, match="a pickle"):
        load_checkpoint(path, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    # the same pickle under the new file name, with a forged size record: not a safetensors file, never unpickled
    (path / "optimizer.pt").rename(path / "optimizer.safetensors")
    for name in ("scheduler", "rng_state"):
        (path / f"{name}.pt").rename(path / f"{name}.safetensors")
    with pytest.raises(PrefalignError, match=r"optimizer\.safetensors: cannot resume: unreadable"):
        resolve_checkpoint(str(path), path.parent)
    with pytest.raises(PrefalignError, match=r"optimizer\.safetensors"):
        load_checkpoint(path, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    assert not marker.exists()


def test_latest_skips_incomplete_and_unreadable_checkpoints_and_names_them(tmp_path):
    for step in (2, 4, 6, 8):
        _ckpt(tmp_path, step)
    (tmp_path / "checkpoint-10").mkdir()  # named like one, never published
    weights = tmp_path / "checkpoint-8" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    optimizer = tmp_path / "checkpoint-6" / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:-10])
    state = tmp_path / "checkpoint-4" / "trainer_state.json"
    state.write_text(state.read_text()[:20])  # half-written
    notes: list[str] = []
    assert resolve_checkpoint("latest", tmp_path, notes.append).name == "checkpoint-2"
    size = (tmp_path / "checkpoint-2" / "model.safetensors").stat().st_size
    assert notes[:3] == [
        "--resume_from_checkpoint latest: skipping checkpoint-10 (incomplete (no trainer_state.json))",
        f"--resume_from_checkpoint latest: skipping checkpoint-8 (model.safetensors: truncated (100 of {size} bytes))",
        "--resume_from_checkpoint latest: skipping checkpoint-6 (optimizer.safetensors: truncated "
        f"({optimizer.stat().st_size} of {optimizer.stat().st_size + 10} bytes))"]
    assert notes[3].startswith("--resume_from_checkpoint latest: skipping checkpoint-4 (trainer_state.json: "
                               "unreadable (not JSON: ") and len(notes) == 4
    with pytest.raises(PrefalignError) as e:
        resolve_checkpoint(str(tmp_path / "checkpoint-8"), tmp_path)
    assert str(e.value) == f"{weights}: cannot resume: truncated (100 of {size} bytes)"
    with pytest.raises(PrefalignError, match=r"no complete checkpoint in .*checkpoint-2 \(model\.safetensors: missing"):
        (tmp_path / "checkpoint-2" / "model.safetensors").unlink()
        resolve_checkpoint("latest", tmp_path, notes.append)


def test_resume_paths_that_do_not_exist(tmp_path):
    with pytest.raises(PrefalignError) as e:
        resolve_checkpoint(str(tmp_path / "nope"), tmp_path)
    assert str(e.value) == f"--resume_from_checkpoint {tmp_path / 'nope'}: does not exist"
    with pytest.raises(PrefalignError, match=r"no checkpoint found in .*empty \(the directory does not exist\)"):
        resolve_checkpoint("latest", tmp_path / "empty")


def test_a_failed_save_leaves_no_trace_and_latest_keeps_the_previous(tmp_path):
    _ckpt(tmp_path, 2)

    def crash(d):
        (d / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("boom")

    opt = torch.optim.AdamW(_model().parameters())
    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, TrainState(global_step=4), crash, opt.state_dict(),
                        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]  # the staging directory is gone
    assert resolve_checkpoint("latest", tmp_path).name == "checkpoint-2"


def test_second_interrupt_during_the_save_abandons_it_and_says_what_is_left(tmp_path):
    """The second Ctrl-C is a real SIGINT, delivered while the checkpoint's weights are being written."""
    notes: list[str] = []
    for earlier in (False, True):
        out = tmp_path / f"run{int(earlier)}"
        if earlier:
            _ckpt(out, 2)
        model = _model()
        opt = torch.optim.AdamW(model.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

        def weights_then_ctrl_c(d, model=model):
            _weights(model)(d)
            # Python runs the SIGINT handler at its next check in the main thread; with the collector off no
            # finalizer (__del__, where an exception is swallowed) can be that place, and the sleep is where it
            # lands at the latest.
            gc.disable()
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(10)
            finally:
                gc.enable()
            raise AssertionError("SIGINT was not delivered")

        def save(out=out, opt=opt, sched=sched, weights=weights_then_ctrl_c):
            return save_checkpoint(out, TrainState(global_step=5), weights, opt.state_dict(), sched)

        # Python's own Ctrl-C handler, also when the suite runs as a background job (which ignores SIGINT)
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            save_after_interrupt(save, 5, out, "Ctrl-C", notes.append)
        finally:
            signal.signal(signal.SIGINT, previous)
        assert [p.name for p in out.iterdir()] == (["checkpoint-2"] if earlier else [])
    assert notes[1::2] == [
        "Interrupted again: checkpoint-5 was abandoned and removed; no checkpoint was written: start again with "
        "--overwrite_output_dir (or another --output_dir)",
        "Interrupted again: checkpoint-5 was abandoned and removed; the latest complete checkpoint is checkpoint-2: "
        "resume with --resume_from_checkpoint latest"]
    save_after_interrupt(lambda: None, 0, tmp_path, "SIGTERM", notes.append)
    assert notes[-1] == "\nInterrupted (SIGTERM) before the first optimizer step: nothing to save"


def test_stale_leftovers_of_killed_writers_are_cleared(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _ckpt(tmp_path, 3)
    (tmp_path / f".tmp-checkpoint-5-{dead.pid}").mkdir()
    os.replace(tmp_path / "checkpoint-3", tmp_path / f".old-checkpoint-3-{dead.pid}")  # killed between renames
    (tmp_path / f".tmp-checkpoint-7-{os.getppid()}").mkdir()  # a live process's save in progress
    assert remove_stale(tmp_path) == [f".tmp-checkpoint-5-{dead.pid}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".tmp-checkpoint-7-{os.getppid()}", "checkpoint-3"]
    assert resolve_checkpoint("latest", tmp_path).name == "checkpoint-3"


def test_save_total_limit(tmp_path):
    for limit, kept in ((2, ["checkpoint-3", "checkpoint-4"]), (0, [f"checkpoint-{s}" for s in (1, 2, 3, 4)])):
        for step in (1, 2, 3, 4):
            _ckpt(tmp_path / str(limit), step, save_total_limit=limit)
        assert [p.name for p in list_checkpoints(tmp_path / str(limit))] == kept
    assert "0 keeps them all" in field_help(TrainArgs)["save_total_limit"]
    with pytest.raises(PrefalignError, match="--save_total_limit: must not be negative"):
        check_train_args(TrainArgs(output_dir="o", save_total_limit=-1))


# ---------------------------------------------------------------- --optim: fused AdamW or torch's per-tensor loop


def _optim_args(tmp_path, optim: str) -> TrainArgs:
    return TrainArgs(output_dir=str(tmp_path), optim=optim, weight_decay=0.1, learning_rate=1e-2)


def test_fused_by_default_and_the_same_update_as_the_loop(tmp_path) -> None:
    fused_model, loop_model = _model(), _model()
    fused = build_optimizer(fused_model, TrainArgs(output_dir=str(tmp_path), weight_decay=0.1, learning_rate=1e-2))
    loop = build_optimizer(loop_model, _optim_args(tmp_path, "adamw_torch"))
    assert all(g["fused"] for g in fused.param_groups) and not any(g["fused"] for g in loop.param_groups)
    assert [g["weight_decay"] for g in fused.param_groups] == [0.1, 0.0]  # biases and norms undecayed either way
    _train(fused_model, fused, build_scheduler(fused, _optim_args(tmp_path, "adamw_torch_fused"), 10), 5)
    _train(loop_model, loop, build_scheduler(loop, _optim_args(tmp_path, "adamw_torch"), 10), 5)
    for a, b in zip(fused_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:Complex modules")
def test_parameters_without_a_fused_kernel_fall_back_to_the_loop(tmp_path) -> None:
    model = torch.nn.Linear(4, 2).to(torch.complex64)  # no fused kernel for complex tensors
    opt = build_optimizer(model, _optim_args(tmp_path, "adamw_torch_fused"))
    assert not any(g["fused"] for g in opt.param_groups)


def test_a_loop_checkpoint_resumes_into_the_fused_optimizer(tmp_path) -> None:
    """Checkpoints written before the fused default (adamw_torch) load into it and continue the same way; the
    resumed run keeps its own --optim, not the checkpoint's."""
    model = _model()
    loop_args, fused_args = _optim_args(tmp_path, "adamw_torch"), _optim_args(tmp_path, "adamw_torch_fused")
    loop = build_optimizer(model, loop_args)
    sched = build_scheduler(loop, loop_args, 10)
    _train(model, loop, sched, 3)
    path = save_checkpoint(tmp_path, TrainState(global_step=3, total_steps=10), _weights(model), loop.state_dict(),
                           sched)
    resumed = _model()
    resumed.load_state_dict(model.state_dict())  # the caller loads the weights (load_checkpoint: the rest)
    fused = build_optimizer(resumed, fused_args)
    fused_sched = build_scheduler(fused, fused_args, 10)
    load_checkpoint(path, resumed, fused, fused_sched)
    assert all(g["fused"] for g in fused.param_groups)
    _train(model, loop, sched, 3, seed=2)
    _train(resumed, fused, fused_sched, 3, seed=2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
