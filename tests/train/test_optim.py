"""build_optimizer: AdamW fused (transformers' default, --optim adamw_torch_fused) or torch's per-tensor loop, the
same update either way, and a checkpoint of one resumes into the other."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from prefalign.config import TrainArgs
from prefalign.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from prefalign.train.optim import build_optimizer, build_scheduler


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))


def _train(model, opt, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 6, generator=gen)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def _args(tmp_path, optim: str) -> TrainArgs:
    return TrainArgs(output_dir=str(tmp_path), optim=optim, weight_decay=0.1, learning_rate=1e-2)


def test_fused_by_default_and_the_same_update_as_the_loop(tmp_path) -> None:
    fused_model, loop_model = _model(), _model()
    fused = build_optimizer(fused_model, TrainArgs(output_dir=str(tmp_path), weight_decay=0.1, learning_rate=1e-2))
    loop = build_optimizer(loop_model, _args(tmp_path, "adamw_torch"))
    assert all(g["fused"] for g in fused.param_groups) and not any(g["fused"] for g in loop.param_groups)
    assert [g["weight_decay"] for g in fused.param_groups] == [0.1, 0.0]  # biases and norms undecayed either way
    _train(fused_model, fused, 5)
    _train(loop_model, loop, 5)
    for a, b in zip(fused_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:Complex modules")
def test_parameters_without_a_fused_kernel_fall_back_to_the_loop(tmp_path) -> None:
    model = torch.nn.Linear(4, 2).to(torch.complex64)  # no fused kernel for complex tensors
    opt = build_optimizer(model, _args(tmp_path, "adamw_torch_fused"))
    assert not any(g["fused"] for g in opt.param_groups)


def test_a_loop_checkpoint_resumes_into_the_fused_optimizer(tmp_path) -> None:
    """Checkpoints written before the fused default (adamw_torch) load into it and continue the same way."""
    model = _model()
    loop = build_optimizer(model, _args(tmp_path, "adamw_torch"))
    sched = build_scheduler(loop, _args(tmp_path, "adamw_torch"), 10)
    _train(model, loop, 3)
    def weights(directory: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                  str(directory / "model.safetensors"))

    path = save_checkpoint(tmp_path, TrainState(global_step=3, total_steps=10), weights, loop.state_dict(), sched)
    resumed = _model()
    resumed.load_state_dict(model.state_dict())  # the caller loads the weights (load_checkpoint: the rest)
    fused = build_optimizer(resumed, _args(tmp_path, "adamw_torch_fused"))
    load_checkpoint(path, resumed, fused, build_scheduler(fused, _args(tmp_path, "adamw_torch_fused"), 10))
    assert all(g["fused"] for g in fused.param_groups)  # the run's --optim, not the checkpoint's
    _train(model, loop, 3, seed=2)
    _train(resumed, fused, 3, seed=2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
