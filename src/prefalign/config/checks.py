"""Checks of a config that need nothing loaded: required flags, ranges, names. Each failure is one PrefalignError
naming the flag. Commands run them first, and `prefalign pipeline` runs every stage's before the first one trains."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from prefalign.config.common import LengthArgs, LoraArgs, TrainArgs
from prefalign.errors import PrefalignError

QUANT_TYPES = ("nf4", "fp4")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr")
OPTIMIZERS = ("adamw_torch_fused", "adamw_torch")
TRUNCATION_MODES = ("keep_end", "keep_start")


def require(cfg: Any, *flags: str) -> None:
    """Flags a command cannot run without, named in a one-line error."""
    for flag in flags:
        if not getattr(cfg, flag):
            raise PrefalignError("is required", f"--{flag}")


def check_finite(cfg: Any) -> None:
    """Every number of a config is finite: nan or inf (from the Python API; the command line refuses them while
    parsing) would otherwise surface as a traceback from torch.optim or as a run that trains on nan."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise PrefalignError(f"must be a finite number, got {v}", f"--{f.name}")


def check_model_args(args: LoraArgs) -> None:
    """The LoRA and 4-bit settings (checked whether or not --use_peft / --load_in_4bit is given: a pipeline may turn
    them on later)."""
    if args.lora_r < 1:
        raise PrefalignError(f"must be at least 1, got {args.lora_r}", "--lora_r")
    if args.lora_alpha <= 0:
        raise PrefalignError(f"must be positive, got {args.lora_alpha}", "--lora_alpha")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise PrefalignError(f"must be in [0, 1), got {args.lora_dropout}", "--lora_dropout")
    if args.lora_target_modules is not None and not args.lora_target_modules:
        raise PrefalignError("give at least one module name, or leave it out for every linear layer",
                             "--lora_target_modules")
    if getattr(args, "bnb_4bit_quant_type", "nf4") not in QUANT_TYPES:
        raise PrefalignError(f"must be nf4 or fp4, got {args.bnb_4bit_quant_type!r}", "--bnb_4bit_quant_type")


def check_train_args(args: TrainArgs) -> None:
    """The training loop's flags, every number finite, and the model's LoRA settings when `args` carries them."""
    check_finite(args)
    if isinstance(args, LoraArgs):  # every training config with LoRA flags, the reward model's too
        check_model_args(args)
    if not args.output_dir:
        raise PrefalignError("is required", "--output_dir")
    if args.lr_scheduler_type not in SCHEDULERS:
        raise PrefalignError(f"unknown schedule {args.lr_scheduler_type!r}; choose one of {', '.join(SCHEDULERS)}",
                             "--lr_scheduler_type")
    if args.optim not in OPTIMIZERS:
        raise PrefalignError(f"unknown optimizer {args.optim!r}; choose one of {', '.join(OPTIMIZERS)}", "--optim")
    if args.bf16 and args.fp16:
        raise PrefalignError("choose one of --bf16 and --fp16", "--bf16")
    positive = {"per_device_train_batch_size": args.per_device_train_batch_size,
                "per_device_eval_batch_size": args.per_device_eval_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps, "logging_steps": args.logging_steps}
    for name, value in positive.items():
        if value < 1:
            raise PrefalignError(f"must be at least 1, got {value}", f"--{name}")
    if args.save_total_limit is not None and args.save_total_limit < 0:
        raise PrefalignError(f"must not be negative (0 keeps every checkpoint), got {args.save_total_limit}",
                             "--save_total_limit")
    if args.learning_rate < 0:
        raise PrefalignError("must not be negative", "--learning_rate")
    if not 0.0 <= args.warmup_ratio <= 1.0:
        raise PrefalignError(f"must be between 0 and 1 (a fraction of all steps), got {args.warmup_ratio}",
                             "--warmup_ratio")
    if args.warmup_steps < 0:
        raise PrefalignError(f"must not be negative, got {args.warmup_steps}", "--warmup_steps")
    if not 0.0 <= args.min_lr_rate <= 1.0:
        raise PrefalignError(f"must be between 0 and 1 (a fraction of the peak), got {args.min_lr_rate}",
                             "--min_lr_rate")
    if args.eval_steps is not None and args.eval_steps < 1:
        raise PrefalignError(f"must be at least 1 (leave it out to evaluate only at the end), got {args.eval_steps}",
                             "--eval_steps")
    if args.save_steps < 0:
        raise PrefalignError(f"must not be negative (0 disables checkpoints), got {args.save_steps}", "--save_steps")
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        raise PrefalignError("give a positive --num_train_epochs or --max_steps", "--num_train_epochs")
    unknown = set(args.report_to) - {"none", "tensorboard", "wandb", "all"}
    if unknown:
        raise PrefalignError(f"unknown destination {sorted(unknown)[0]!r}; choose none, tensorboard or wandb",
                             "--report_to")


def check_truncation(args: LengthArgs) -> None:
    """--truncation_mode and the three length limits."""
    if args.truncation_mode not in TRUNCATION_MODES:
        raise PrefalignError(f"must be keep_end or keep_start, got '{args.truncation_mode}'", where="--truncation_mode")
    for flag in ("max_length", "max_prompt_length", "max_completion_length"):
        value = getattr(args, flag)
        least = 2 if flag == "max_length" else 1
        if value is not None and value < least:
            raise PrefalignError(f"must be at least {least}, got {value}", where=f"--{flag}")


def check_ref_sync(cfg: Any) -> None:
    """TR-DPO's flags (config.preference.RefSyncArgs), refused where there is no separate reference to move."""
    if not cfg.sync_ref_model:
        return
    if not 0.0 < cfg.ref_model_mixup_alpha <= 1.0:
        raise PrefalignError(f"must lie in (0, 1], got {cfg.ref_model_mixup_alpha}", "--ref_model_mixup_alpha")
    if cfg.ref_model_sync_steps < 1:
        raise PrefalignError(f"must be at least 1, got {cfg.ref_model_sync_steps}", "--ref_model_sync_steps")
    if cfg.use_peft or cfg.peft_adapter_path or cfg.load_in_4bit:
        raise PrefalignError("a LoRA policy's reference is its own base (adapter disabled, or a frozen adapter), not a "
                             "separate model to move; train full weights or drop --sync_ref_model", "--sync_ref_model")
    if cfg.precompute_ref_log_probs:
        raise PrefalignError("precomputed reference log-probs would go stale once the reference moves; drop one of "
                             "--sync_ref_model and --precompute_ref_log_probs", "--sync_ref_model")
