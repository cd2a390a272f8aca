"""What a run tells its user: the block printed before the first step, and the numbers of the closing line.

Every training stage feeds the same function: its builder fills a `RunFacts` (what it kept of each split, the
unit it batches, the layout and the reference it chose), `train_and_save` adds the model and the config, and the
loop adds the plan (steps, where a resumed run starts) just before the first step. Printed by the main process:

    dpo: starting
      data        train: 24 of 24 pairs kept (prompt truncated 0, completion truncated 0, dropped 0)
      steps       6 optimizer steps (2 epochs of 3)
      batch       8 pairs per optimizer step = 4 per device x 2 accumulation x 1 process
      parameters  94.2K trainable of 1.3M (7.2%, LoRA r=16)
      layout      packed, shared prompt
      reference   the base model with the LoRA adapter disabled
      output      runs/dpo
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from prefalign.model.reference import (
    AdapterReference,
    DisabledAdapterReference,
    FrozenModelReference,
    Reference,
)
from prefalign.train.loop import LoopPlan
from prefalign.train.metrics import human


@dataclass(frozen=True)
class SplitCount:
    """What a stage kept of one split: `kept` of `total` examples (`unit`), and what happened to the rest."""

    split: str
    kept: int
    total: int | None  # None: nothing is dropped at this stage (blocks, prompts), only `kept` is shown
    unit: str
    notes: str = ""  # e.g. "prompt truncated 3, dropped 2 (chosen and rejected are identical: 2)"

    @classmethod
    def of(cls, split: str, stats: Any, unit: str) -> SplitCount:
        """From a tokenization stats object (data.tokenize.TokenizeStats, data.sft.SFTTokenizeStats): its kept and
        total counts, and its one-line summary after the "kept N" part."""
        notes = stats.summary().split(f"kept {stats.kept}", 1)[-1].lstrip(", ")
        return cls(split, stats.kept, stats.total, unit, notes)

    def describe(self) -> str:
        text = f"{self.split}: {self.kept} {self.unit}" if self.total is None else (
            f"{self.split}: {self.kept} of {self.total} {self.unit} kept")
        return f"{text} ({self.notes})" if self.notes else text


@dataclass
class RunFacts:
    """What a stage's builder knows and the loop does not."""

    splits: list[SplitCount] = field(default_factory=list)
    unit: str = "examples"  # what --per_device_train_batch_size counts: pairs, samples, completions, ...
    layout: str = "padded"  # and why, when a faster layout fell back
    reference: str = "none"
    extra: dict[str, str] = field(default_factory=dict)  # stage-specific lines, e.g. {"rollout": "..."}


def describe_reference(reference: Reference | None, cfg: Any, why_none: str = "the loss needs none") -> str:
    """The reference a run uses, in words (`why_none` when there is none)."""
    if reference is None:
        return f"none ({why_none})"
    if isinstance(reference, DisabledAdapterReference):
        return "the base model with the LoRA adapter disabled (no copy)"
    if isinstance(reference, AdapterReference):
        return f"a frozen copy of the adapter {getattr(cfg, 'peft_adapter_path', '')} in the same base model"
    if isinstance(reference, FrozenModelReference) and getattr(cfg, "ref_model_name_or_path", None):
        return f"{cfg.ref_model_name_or_path} (frozen)"
    return "a frozen copy of the initial policy"


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of what the loop optimises; peft's own count where it has one, since it
    counts 4-bit weights at their real size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    # ds_numel: the full size of a parameter that DeepSpeed ZeRO-3 partitioned (its own numel() is its shard)
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in params]
    return sum(n for n, trainable in sizes if trainable), sum(n for n, _ in sizes)


def duration(seconds: float) -> str:
    """12.3 -> '12.3 s', 754 -> '12 min 34 s', 7384 -> '2 h 03 min'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _steps(plan: LoopPlan, args: Any) -> str:
    if args.max_steps > 0:
        text = f"{plan.total_steps} optimizer steps (--max_steps; an epoch is {plan.steps_per_epoch})"
    else:
        text = f"{plan.total_steps} optimizer steps ({args.num_train_epochs:g} epochs of {plan.steps_per_epoch})"
    return text + (f", resuming at step {plan.start_step}" if plan.start_step else "")


def _processes(n: int) -> str:
    return f"{n} process{'es' if n > 1 else ''}"


def _batch(args: Any, facts: RunFacts, num_processes: int) -> str:
    """The effective batch: per device x accumulation x processes."""
    per_device, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    budget = getattr(args, "max_tokens_per_batch", None)
    if budget and facts.layout.startswith("packed"):  # micro-batches by token budget, not by count
        return f"micro-batches of up to {budget} tokens x {accumulation} accumulation x {_processes(num_processes)}"
    total = per_device * accumulation * num_processes
    return (f"{total} {facts.unit} per optimizer step = {per_device} per device x {accumulation} accumulation x "
            f"{_processes(num_processes)}")


def _parameters(model: nn.Module, args: Any) -> str:
    trainable, total = parameter_counts(model)
    share = 100.0 * trainable / max(total, 1)
    kind = ""
    if getattr(args, "peft_adapter_path", None):
        kind = f", continuing the LoRA adapter {args.peft_adapter_path}"
    elif getattr(args, "use_peft", False) or getattr(args, "load_in_4bit", False):
        kind = f", {'QLoRA' if getattr(args, 'load_in_4bit', False) else 'LoRA'} r={args.lora_r}"
    return f"{human(trainable)} trainable of {human(total)} ({share:.3g}%{kind or ', full weights'})"


def start_block(name: str, args: Any, facts: RunFacts, model: nn.Module, plan: LoopPlan,
                num_processes: int) -> str:
    """The lines printed before the first optimizer step (see the module docstring)."""
    rows: list[tuple[str, str]] = [("data", s.describe()) for s in facts.splits]
    rows += [("steps", _steps(plan, args)), ("batch", _batch(args, facts, num_processes)),
             ("parameters", _parameters(model, args)), ("layout", facts.layout)]
    rows += list(facts.extra.items())
    rows += [("reference", facts.reference), ("output", str(args.output_dir))]
    lines = [f"{name}: starting"]
    previous = None
    for label, value in rows:
        lines.append(f"  {'' if label == previous else label:<11} {value}")
        previous = label
    return "\n".join(lines)


def summary_numbers(tokens: float, train_seconds: float, wall_seconds: float) -> str:
    """The throughput part of the closing line, e.g. '1.2K tokens/s, 9.8 s training, 14.2 s in all': tokens
    trained per second of the loop's wall time (sampling, evaluation and checkpoints included), then the loop's
    time and the whole command's (loading and saving included)."""
    parts = [f"{human(tokens / train_seconds)} tokens/s"] if tokens and train_seconds > 0 else []
    parts.append(f"{duration(train_seconds)} training")
    if wall_seconds:
        parts.append(f"{duration(wall_seconds)} in all")
    return ", ".join(parts)
