"""The optimizer, its learning-rate schedule and the step count of a run, as every stage's loop builds them."""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import get_scheduler

from prefalign.config import TrainArgs

# What torch's fused AdamW kernel takes (torch.optim.adamw: float tensors on these devices).
FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu", "hpu")
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def build_optimizer(model: torch.nn.Module, args: TrainArgs) -> torch.optim.Optimizer:
    """AdamW with no weight decay on biases and norm weights (1-D parameters); fused (`--optim
    adamw_torch_fused`) where torch has the kernel for every parameter, the per-tensor loop otherwise."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = args.optim == "adamw_torch_fused" and all(
        p.device.type in FUSED_DEVICES and p.dtype in FUSED_DTYPES for p in params)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        fused=fused or None,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainArgs, total_steps: int) -> Any:
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)
    kwargs = {"min_lr_rate": args.min_lr_rate} if args.lr_scheduler_type == "cosine_with_min_lr" else None
    return get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
        scheduler_specific_kwargs=kwargs,
    )


def steps_per_epoch(args: TrainArgs, groups_per_epoch: int, num_processes: int) -> int:
    return max(1, math.ceil(groups_per_epoch / (args.gradient_accumulation_steps * num_processes)))


def total_steps_for(args: TrainArgs, groups_per_epoch: int, num_processes: int) -> int:
    per_epoch = steps_per_epoch(args, groups_per_epoch, num_processes)
    return args.max_steps if args.max_steps > 0 else max(1, math.ceil(args.num_train_epochs * per_epoch))
