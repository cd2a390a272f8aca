"""What every training command does around the loop: check the config and the output directory before anything
heavy happens, set up Accelerate and seeds, and save the final model atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefalign.config import TrainArgs
from prefalign.errors import PrefalignError

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr")
FINAL_MARKERS = ("config.json", "adapter_config.json", "model.safetensors", "adapter_model.safetensors")


def require(cfg: Any, *flags: str) -> None:
    """Flags a command cannot run without, named in a one-line error."""
    for flag in flags:
        if not getattr(cfg, flag):
            raise PrefalignError("is required", f"--{flag}")


def check_train_args(args: TrainArgs) -> None:
    """Reject bad values before any model is loaded."""
    if not args.output_dir:
        raise PrefalignError("is required", "--output_dir")
    if args.lr_scheduler_type not in SCHEDULERS:
        raise PrefalignError(f"unknown schedule {args.lr_scheduler_type!r}; choose one of {', '.join(SCHEDULERS)}",
                             "--lr_scheduler_type")
    if args.bf16 and args.fp16:
        raise PrefalignError("choose one of --bf16 and --fp16", "--bf16")
    positive = {"per_device_train_batch_size": args.per_device_train_batch_size,
                "per_device_eval_batch_size": args.per_device_eval_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps, "logging_steps": args.logging_steps}
    for name, value in positive.items():
        if value < 1:
            raise PrefalignError(f"must be at least 1, got {value}", f"--{name}")
    if args.learning_rate < 0:
        raise PrefalignError("must not be negative", "--learning_rate")
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        raise PrefalignError("give a positive --num_train_epochs or --max_steps", "--num_train_epochs")
    unknown = set(args.report_to) - {"none", "tensorboard", "wandb", "all"}
    if unknown:
        raise PrefalignError(f"unknown destination {sorted(unknown)[0]!r}; choose none, tensorboard or wandb",
                             "--report_to")
    check_output_dir(args)


def check_output_dir(args: TrainArgs) -> None:
    """A new run never overwrites what an earlier run left, unless asked to."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise PrefalignError("exists and is not a directory", f"--output_dir {out}")
    if args.resume_from_checkpoint or args.overwrite_output_dir or not out.is_dir():
        return
    earlier = [m for m in (*FINAL_MARKERS, "metrics.jsonl") if (out / m).exists()]
    earlier += [p.name for p in out.glob("checkpoint-*")][:1]
    if earlier:
        raise PrefalignError(
            f"already holds an earlier run ({earlier[0]}); resume it with --resume_from_checkpoint latest, "
            "or pass --overwrite_output_dir, or choose another directory",
            f"--output_dir {out}",
        )


def make_accelerator(args: TrainArgs) -> Any:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from prefalign.train.distributed import check_launch

    check_launch()
    mixed = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
    log_with = [r for r in args.report_to if r != "none"] or None
    # Without cpu=True, Accelerate ignores a torchrun process group on a machine with no accelerator.
    cpu_only = not (torch.cuda.is_available() or torch.backends.mps.is_available()
                    or (hasattr(torch, "xpu") and torch.xpu.is_available()))
    # Accelerate keeps its settings in a process-wide singleton; a second run in the same process (the Python API,
    # `prefalign pipeline`) with another mixed precision would be refused. Reset those settings but keep the process
    # group (PartialState), which must outlive the run under torchrun.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=mixed, log_with=log_with, project_dir=args.output_dir, cpu=cpu_only)
    set_seed(args.seed)
    return accelerator


def start_run(args: TrainArgs, accelerator: Any, run_name: str) -> None:
    """Create output_dir, start trackers and write the resolved config (`args`, the command's whole config)
    beside the results."""
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite_output_dir and not args.resume_from_checkpoint and (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()
        (out / "prefalign_config.json").write_text(json.dumps(dataclasses.asdict(args), indent=2, default=str))
    if accelerator.log_with:
        accelerator.init_trackers(run_name, config={k: str(v) for k, v in dataclasses.asdict(args).items()})
    accelerator.wait_for_everyone()


def save_final(output_dir: str | Path, write: Callable[[Path], None]) -> None:
    """Write the final model into a temporary directory, then move its files into output_dir. Every process calls
    this (`write` may gather sharded weights); the main process writes."""
    from prefalign.model.weights import is_main_process

    out = Path(output_dir)
    tmp = out / f".tmp-final-{os.getpid()}"
    if is_main_process():
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    write(tmp)
    if not is_main_process():
        return
    for item in tmp.iterdir():
        target = out / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)
    tmp.rmdir()


def train_and_save(stage: Any, model: Any, tokenizer: Any, cfg: Any, accelerator: Any, run_name: str, *,
                   final_model: Any = None, save: Callable[[Path], None] | None = None,
                   load: Callable[[Path], None] | None = None) -> Any:
    """The common tail of every training command: start the run (output_dir, config, trackers), the loop with
    Hugging Face-format checkpoints, then the final model (`final_model`, default `model`) and tokenizer saved
    atomically into output_dir by the main process."""
    from prefalign.model.load import save_model
    from prefalign.model.weights import load_weights_into
    from prefalign.train.distributed import shard_plan
    from prefalign.train.loop import train_loop

    plan = shard_plan(accelerator)
    if plan is not None and getattr(cfg, "merge_adapter", False) and hasattr(final_model or model, "peft_config"):
        raise PrefalignError("cannot merge a sharded (FSDP) model; merge the saved adapter afterwards",
                             "--merge_adapter")
    final_model = model if final_model is None else final_model
    start_run(cfg, accelerator, run_name)
    save = save or (lambda d: save_model(final_model, tokenizer, d, merge_adapter=False))
    load = load or (lambda d: load_weights_into(final_model, d))
    result = train_loop(stage, model, cfg, accelerator, save, load, plan)
    if result.interrupted:
        raise KeyboardInterrupt
    save_final(cfg.output_dir, lambda d: save_model(final_model, tokenizer, d, merge_adapter=cfg.merge_adapter))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def print_summary(name: str, result: Any, output_dir: str, shown: tuple[str, ...], what: str = "model") -> None:
    """One closing line (from rank 0 only under torchrun): steps, the chosen metrics, where the result is."""
    if os.environ.get("RANK", "0") != "0":
        return
    metrics = {**result.last_metrics, **result.eval_metrics}
    values = ", ".join(f"{k}={metrics[k]:.4g}" for k in shown if k in metrics)
    print(f"{name}: {result.state.global_step} steps, {values}; {what} saved to {output_dir}")


def disable_dropout(model: Any) -> None:
    """Zero every dropout (TRL's default for preference and RL training): nn.Dropout modules, LoRA's included, and
    attention-dropout rates stored as floats, so that policy and reference agree exactly before the first update."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
