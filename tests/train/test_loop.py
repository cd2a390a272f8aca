"""train.loop: the learning-rate schedules and warmup, weight decay kept off biases and norms, evaluation every
--eval_steps, and grad_norm logged before clipping (the last three through a real `prefalign dpo` run)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import conv, run_cli, write_jsonl
from prefalign.config import TrainArgs
from prefalign.train.metrics import read_metrics
from prefalign.train.optim import build_optimizer, build_scheduler

PEAK = 1e-3


def _expected(kind: str, s: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """The multiplier of the peak rate after s scheduler steps, written out from the schedules' definitions."""
    if s < warmup and kind != "constant":
        return s / warmup
    progress = (s - warmup) / max(1, total - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return {"linear": max(0.0, (total - s) / max(1, total - warmup)), "cosine": cosine, "constant": 1.0,
            "constant_with_warmup": 1.0, "cosine_with_min_lr": floor + (1 - floor) * cosine}[kind]


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"])
@pytest.mark.parametrize("warmup", [{"warmup_steps": 3}, {"warmup_ratio": 0.25}, {"warmup_steps": 3, "warmup_ratio": 0.9}])
def test_schedules_and_warmup(kind, warmup):
    """10 steps; warmup 3 steps, or ceil(0.25 x 10) = 3 from the ratio; --warmup_steps wins over --warmup_ratio.
    cosine_with_min_lr ends at --min_lr_rate x the peak (MiniMind's cosine), here 0.2."""
    args = TrainArgs(output_dir="o", learning_rate=PEAK, lr_scheduler_type=kind, min_lr_rate=0.2, **warmup)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=PEAK)
    scheduler = build_scheduler(optimizer, args, total_steps=10)
    got = []
    for _ in range(11):
        got.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    want = [PEAK * _expected(kind, s, 3, 10, floor=0.2) for s in range(11)]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)
    if kind == "cosine_with_min_lr":
        assert got[10] == pytest.approx(0.2 * PEAK)


def test_weight_decay_spares_biases_and_norms(tiny_model_dir):
    """With zero gradients AdamW's update is the decoupled decay alone: every matrix shrinks by exactly
    (1 - lr x wd); 1-D parameters (Qwen2's q/k/v biases, RMSNorm weights) do not move."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    optimizer = build_optimizer(model, TrainArgs(output_dir="o", learning_rate=0.1, weight_decay=0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    kinds = set()
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            torch.testing.assert_close(p.detach(), before[name] * (1 - 0.1 * 0.5), rtol=1e-6, atol=0)
        else:
            assert torch.equal(p.detach(), before[name]), name
            kinds.add("bias" if name.endswith("bias") else "norm")
    assert kinds == {"bias", "norm"}


def test_eval_steps_lr_schedule_and_grad_norm_before_clipping(tiny_model_dir, tmp_path):
    rows = [{"prompt": conv(("user", f"what is {i} + 2")), "chosen": conv(("assistant", f"{i + 2}")),
             "rejected": conv(("assistant", f"{i + 3} no"))} for i in range(16)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    common = ("--per_device_train_batch_size", 4, "--eval_split_ratio", 0.25, "--learning_rate", PEAK)
    out = tmp_path / "run"
    assert run_cli("dpo", tiny_model_dir, data, out, *common, "--max_steps", 4, "--eval_steps", 2,
                   "--lr_scheduler_type", "cosine_with_min_lr", "--warmup_steps", 2, "--min_lr_rate", 0.1,
                   "--max_grad_norm", 1e-6) == 0
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]  # every 2 steps, and no second evaluation at the end
    # the rate a step used: before its scheduler step, so step k logs schedule(k - 1)
    assert [r["learning_rate"] for r in train] == pytest.approx([PEAK * _expected("cosine_with_min_lr", k, 2, 4)
                                                                 for k in range(4)])
    unclipped = tmp_path / "unclipped"
    assert run_cli("dpo", tiny_model_dir, data, unclipped, *common, "--max_steps", 1, "--max_grad_norm", 0) == 0
    # step 1: same weights, same batch; clipping to 1e-6 must not change the logged (pre-clip) norm
    norm = read_metrics(unclipped / "metrics.jsonl")[0]["grad_norm"]
    assert norm > 1e-3 and train[0]["grad_norm"] == pytest.approx(norm, rel=1e-6)
