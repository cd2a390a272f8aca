"""The one training loop every stage (pretrain, sft, rm, dpo, grpo, ppo) runs.

A stage supplies its data as index groups (one group = one micro-batch), how much each group weighs in the
loss normalisation, and a `step` that returns the summed per-example loss with its metrics. The loop owns the
rest: AdamW, schedule, accumulation, clipping, logging, evaluation, checkpoints, resume and Ctrl-C.

Accumulation is normalised by the total weight of the optimizer step's micro-batches (pairs for DPO, tokens for
SFT), known before any forward, so batch B x accumulation A gives the same update as batch A·B x 1.

Data parallelism: every process sees the same index groups and takes every `num_processes`-th micro-batch of
each optimizer step; gradients are averaged with one all-reduce per optimizer step (no sync per micro-batch).
Under FSDP (`train/distributed.py`) the model is sharded here, after any resumed weights are loaded, and FSDP
averages the gradients itself in backward. Under DeepSpeed (`train/zero.py`) the model and the loop's AdamW go into
a DeepSpeedEngine here, at the same point; the engine reduces, clips and steps, the loop still splits, weighs and
schedules.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable, Iterable, Sequence, Sized
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from prefalign.config import TrainArgs
from prefalign.model.reference import eval_mode, to_device
from prefalign.train import distributed, zero, zero_state
from prefalign.train.checkpoint import (
    TrainState,
    load_checkpoint,
    load_checkpoint_weights,
    resolve_checkpoint,
    save_after_interrupt,
    save_checkpoint,
)
from prefalign.train.metrics import MetricAccumulator, MetricsLog, MetricSums, human
from prefalign.train.optim import build_optimizer, build_scheduler, steps_per_epoch, total_steps_for
from prefalign.train.signals import Terminated, sigterm_as_interrupt

Batch = dict[str, Any]
Group = Sized  # list[int] of example indices, or an online stage's RolloutRows


class Stage(Protocol):
    """What a training stage gives the loop."""

    example_unit: str  # "pairs", "samples", ...: used for the examples/s metric name
    progress_keys: dict[str, str]  # metric name -> short label shown on the progress bar

    # A group is one micro-batch: a sized collection of the stage's examples (`len()` counts them).
    def train_groups(self, epoch: int) -> Sequence[Group]: ...  # a function of the epoch alone
    def eval_groups(self) -> Sequence[Group]: ...
    def batch_weight(self, group: Group, split: str) -> float: ...
    def make_batch(self, group: Group, split: str) -> Batch: ...
    def step(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, MetricSums]: ...
    def eval_step(self, model: torch.nn.Module, batch: Batch) -> MetricSums: ...

    # Optional hooks:
    # - `begin_step(groups)`: called with an optimizer step's micro-batches (this process's and the others')
    #   before any of them is weighed or built; online stages sample the rollout they come from here.
    # - `end_step(global_step, metrics)`: called on every process right after an optimizer step with the step's
    #   reduced metrics (names starting with "_" are kept for it and never logged): TR-DPO moves its reference there,
    #   BCO its running reward mean, before the step is logged, evaluated or checkpointed.
    # - `finish_metrics(metrics) -> metrics`: the reduced metrics of a step or an evaluation, as logged; a stage may
    #   derive some from others (KTO's margins) or drop what is undefined for this batch.
    # - `reference`, a model.reference.Reference; under FSDP its separate frozen model is sharded too.


def shuffled_groups(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Micro-batches of indices for one epoch; the order depends only on (seed, epoch), so resume can skip ahead."""
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def sequential_groups(n: int, batch_size: int) -> list[list[int]]:
    """Micro-batches of indices in file order (evaluation)."""
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


@dataclass
class LoopResult:
    state: TrainState
    last_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    interrupted: bool = False
    interrupt_signal: int = signal.SIGINT  # what interrupted the run: SIGINT (Ctrl-C) or SIGTERM
    train_seconds: float = 0.0  # wall time of this call's steps (sampling, evaluation, checkpoints included)
    tokens: float = 0.0  # tokens trained on in this call (a resumed run's earlier ones not counted)
    wall_seconds: float = 0.0  # the whole command, set by train.setup.train_and_save


@dataclass(frozen=True)
class LoopPlan:
    """What the loop tells `on_start` before its first step (train.runinfo prints it)."""

    total_steps: int
    start_step: int  # > 0 when resumed
    steps_per_epoch: int


# The progress bar: steps, elapsed and ETA by name, then tokens/s and the stage's metrics.
BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed} elapsed, ETA {remaining}{postfix}"


def _postfix(stage: Stage, last: dict[str, float], tokens: float, elapsed: float) -> dict[str, str]:
    """tokens/s over the run so far (end to end: sampling and evaluation included), then the stage's metrics."""
    out = {"tok/s": human(tokens / max(elapsed, 1e-9))} if tokens else {}
    out.update({label: f"{last[k]:.4g}" for k, label in stage.progress_keys.items() if k in last})
    return out


def _all_reduce_grads(model: torch.nn.Module, accelerator: Any) -> None:
    """Average gradients across processes: one flat all-reduce per optimizer step. A parameter may have a gradient
    on one process and none on another (a VLM's trained vision tower on a process whose micro-batches held no
    image): a small all-reduce of which parameters have one first, so every process sends the same tensors."""
    if accelerator.num_processes == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=accelerator.device)
    torch.distributed.all_reduce(has, op=torch.distributed.ReduceOp.MAX)
    for p, flag in zip(params, has.tolist()):
        if flag and p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= accelerator.num_processes
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def accumulate_eval(stage: Stage, model: torch.nn.Module, groups: Iterable[tuple[Group, bool]],
                    device: torch.device, autocast: Callable[[], Any] = nullcontext) -> MetricAccumulator:
    """Evaluation metric sums over (group, counts) micro-batches, without grad and in eval mode (restored after);
    a group with counts=False runs (its forward may hold collectives) but adds nothing."""
    acc = MetricAccumulator()
    with torch.no_grad(), eval_mode(model):
        for group, counts in groups:
            with autocast():
                metrics = stage.eval_step(model, to_device(stage.make_batch(group, "eval"), device))
            acc.add(metrics if counts else distributed.no_weight(metrics))
    return acc


def evaluate(stage: Stage, model: torch.nn.Module, accelerator: Any) -> dict[str, float]:
    groups = stage.eval_groups()
    if not groups:
        return {}
    shares = distributed.pad_groups(groups, accelerator.process_index, accelerator.num_processes)
    acc = accumulate_eval(stage, model, shares, accelerator.device, accelerator.autocast)
    return {f"eval_{k}": v for k, v in _stage_metrics(stage, acc.reduce(accelerator)).items()}


def _stage_metrics(stage: Stage, metrics: dict[str, float]) -> dict[str, float]:
    finish = getattr(stage, "finish_metrics", None)
    return metrics if finish is None else finish(metrics)


class _Run:
    """The state of one `train_loop` call that its helpers share: where training stands, the optimizer and
    schedule, the metrics log, and the token count kept across resumes."""

    def __init__(self, stage: Stage, model: torch.nn.Module, args: TrainArgs, accelerator: Any,
                 save_model: Callable[[Path], None], plan: distributed.ShardPlan | None) -> None:
        self.stage, self.model, self.args, self.accelerator = stage, model, args, accelerator
        self.save_model, self.sharded = save_model, plan is not None
        self.optimizer = build_optimizer(model, args)
        self.params = [p for p in model.parameters() if p.requires_grad]
        # the parameters of each AdamW group, as torch numbers them in a state_dict (DeepSpeed replaces them)
        self.param_groups = [list(g["params"]) for g in self.optimizer.param_groups]
        self.groups = stage.train_groups(0)  # a stage's groups depend only on the epoch: recomputed per epoch
        self.groups_epoch = 0
        self.total = total_steps_for(args, len(self.groups), accelerator.num_processes)
        self.scheduler = build_scheduler(self.optimizer, args, self.total)
        if zero.active(accelerator):  # the schedule stays ours: it sets the learning rate of AdamW's groups
            self.model = zero.prepare(accelerator, model, self.optimizer)
        self.state = TrainState(total_steps=self.total)
        self.seen_tokens = 0.0  # cumulative tokens trained on (TRL's num_tokens); kept in checkpoints
        self.session_tokens = 0.0  # this call's share of them (the progress bar's and the summary's tokens/s)

    def resume(self, ckpt: Path) -> int:
        """Restore optimizer, schedule, RNG and counters from `ckpt` (the model was loaded before sharding)."""
        restore = (lambda s: zero_state.load_optimizer_state(self.model, self.param_groups, s)) \
            if zero.is_engine(self.model) else None
        self.state, raw_state = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler, restore)
        self.seen_tokens = float(raw_state.get("num_tokens", 0.0))
        self.state.total_steps = self.total
        restart = ""
        if getattr(self.args, "ignore_data_skip", False):  # the user consented: the data position no longer applies
            restart = " (--ignore_data_skip: the data starts from its beginning)"
            self.state.epoch, self.state.micro_index = 0, 0
        self.accelerator.print(f"Resuming from {ckpt} at step {self.state.global_step}{restart}")
        return self.state.global_step

    def checkpoint(self) -> Path:
        """Every process takes part: sharded weights and optimizer state are gathered."""
        extra = {"num_tokens": self.seen_tokens, "config_class": type(self.args).__name__,
                 "num_processes": self.accelerator.num_processes}
        config = dataclasses.asdict(self.args) if dataclasses.is_dataclass(self.args) else None
        optimizer = zero_state.optimizer_state(self.model, self.param_groups) if zero.is_engine(self.model) \
            else distributed.optimizer_state(self.model, self.optimizer)
        path = save_checkpoint(self.args.output_dir, self.state, self.save_model, optimizer, self.scheduler, extra=extra,
                               save_total_limit=self.args.save_total_limit, main=self.accelerator.is_main_process,
                               config=config)
        self.accelerator.wait_for_everyone()
        return path

    def next_step_groups(self) -> list[Any] | None:
        """The micro-batches of the next optimizer step (every process's share), or None at an epoch's end."""
        state, world = self.state, self.accelerator.num_processes
        if self.groups_epoch != state.epoch:
            self.groups, self.groups_epoch = self.stage.train_groups(state.epoch), state.epoch
        step_groups = list(self.groups[state.micro_index : state.micro_index + self.args.gradient_accumulation_steps * world])
        if not step_groups:
            state.epoch, state.micro_index = state.epoch + 1, 0
            return None
        return step_groups

    def step(self, step_groups: list[Any]) -> dict[str, float]:
        """One optimizer step over `step_groups`; returns the step's metrics as logged."""
        state = self.state
        begin = getattr(self.stage, "begin_step", None)
        if begin is not None:  # online stages sample the rollout these micro-batches come from
            begin(step_groups)
        start = time.perf_counter()
        metrics = _optimizer_step(self.stage, self.model, self.params, self.optimizer, self.scheduler, self.args,
                                  self.accelerator, step_groups, sharded=self.sharded)
        state.global_step += 1
        state.micro_index += len(step_groups)
        if state.micro_index >= len(self.groups):
            state.epoch, state.micro_index = state.epoch + 1, 0
        end = getattr(self.stage, "end_step", None)
        if end is not None:  # after the update, before this step is logged, evaluated or checkpointed
            end(state.global_step, metrics)
        last = _finish_metrics(metrics, self.stage, state, len(self.groups), max(time.perf_counter() - start, 1e-9))
        if metrics["_tokens"]:
            self.seen_tokens += metrics["_tokens"]
            self.session_tokens += metrics["_tokens"]
            last["num_tokens"] = self.seen_tokens
        return last


def _resume_then_shard(stage: Stage, model: torch.nn.Module, args: TrainArgs, accelerator: Any,
                       load_model: Callable[[Path], None], plan: distributed.ShardPlan | None,
                       checkpoint: Path | None) -> Path | None:
    """The checkpoint to resume from (`checkpoint`, else --resume_from_checkpoint resolved), its weights loaded into
    the whole model; then, with a `plan` (FSDP), the model and the stage's reference sharded."""
    ckpt = checkpoint
    if ckpt is None and args.resume_from_checkpoint:
        ckpt = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir, accelerator.print)
    if ckpt is not None:
        load_checkpoint_weights(load_model, ckpt)  # into the whole model, before it is sharded
    if plan is not None:
        distributed.shard(model, plan, accelerator.device)
        distributed.shard_reference(getattr(stage, "reference", None), plan, accelerator.device)
    return ckpt


def train_loop(
    stage: Stage,
    model: torch.nn.Module,
    args: TrainArgs,
    accelerator: Any,
    save_model: Callable[[Path], None],
    load_model: Callable[[Path], None],
    plan: distributed.ShardPlan | None = None,
    checkpoint: Path | None = None,
    on_start: Callable[[LoopPlan], None] | None = None,
) -> LoopResult:
    """Run the optimisation; `save_model(dir)`/`load_model(dir)` write and restore weights in HF format; with a
    `plan` (FSDP), the model is sharded here; `on_start` hears the plan just before the first step. `checkpoint`:
    the one to resume from, already resolved (else --resume_from_checkpoint is resolved here)."""
    ckpt = _resume_then_shard(stage, model, args, accelerator, load_model, plan, checkpoint)
    run = _Run(stage, model, args, accelerator, save_model, plan)
    model = run.model  # the DeepSpeedEngine under DeepSpeed
    log = MetricsLog(args.output_dir, accelerator, resume_step=run.resume(ckpt) if ckpt is not None else None)
    if on_start is not None:
        on_start(LoopPlan(run.total, run.state.global_step,
                          steps_per_epoch(args, len(run.groups), accelerator.num_processes)))
    bar = tqdm(total=run.total, initial=run.state.global_step, desc="train", dynamic_ncols=True,
               bar_format=BAR_FORMAT, disable=args.disable_tqdm or not accelerator.is_main_process)
    started = time.perf_counter()
    last: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    model.train()
    interrupted, cause = False, signal.SIGINT
    restore_sigterm = sigterm_as_interrupt()
    try:
        while run.state.global_step < run.total:
            step_groups = run.next_step_groups()
            if step_groups is None:
                continue
            last = run.step(step_groups)
            step = run.state.global_step
            bar.set_postfix(_postfix(stage, last, run.session_tokens, time.perf_counter() - started), refresh=False)
            bar.update(1)
            if step % args.logging_steps == 0 or step == run.total:
                log.write(step, last)
            if args.eval_steps and step % args.eval_steps == 0:
                eval_metrics = evaluate(stage, model, accelerator)
                log.write(step, eval_metrics)
            if args.save_steps and step % args.save_steps == 0 and step < run.total:
                run.checkpoint()
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM; a second one during the save abandons it
        interrupted, cause = True, signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
        save_after_interrupt(run.checkpoint, run.state.global_step, args.output_dir,
                             "SIGTERM" if cause == signal.SIGTERM else "Ctrl-C", accelerator.print)
    finally:
        bar.close()
        restore_sigterm()
    step = run.state.global_step
    if not interrupted and stage.eval_groups() and not (args.eval_steps and step % args.eval_steps == 0):
        eval_metrics = evaluate(stage, model, accelerator)
        log.write(step, eval_metrics)
    return LoopResult(run.state, last, eval_metrics, interrupted, cause, train_seconds=time.perf_counter() - started,
                      tokens=run.session_tokens)


def _optimizer_step(stage: Stage, model: torch.nn.Module, params: list[torch.nn.Parameter],
                    optimizer: torch.optim.Optimizer, scheduler: Any, args: TrainArgs, accelerator: Any,
                    step_groups: list[Group], sharded: bool) -> dict[str, Any]:
    """Accumulate the micro-batches of one optimizer step (this process's share), clip, step."""
    total_weight = sum(stage.batch_weight(g, "train") for g in step_groups)
    acc = MetricAccumulator()
    examples = tokens = 0.0
    engine = zero.is_engine(model)
    shares = distributed.pad_groups(step_groups, accelerator.process_index, accelerator.num_processes)
    for i, (group, counts) in enumerate(shares):
        batch = to_device(stage.make_batch(group, "train"), accelerator.device)
        with accelerator.autocast():
            loss_sum, metrics = stage.step(model, batch)
        # Scale so that, after averaging over processes, the gradient is that of sum(losses) / total_weight.
        scaled = loss_sum * (accelerator.num_processes / total_weight if counts else 0.0)
        if engine:
            zero.backward(model, scaled, last=i == len(shares) - 1)
        else:
            accelerator.backward(scaled)
        acc.add(metrics if counts else distributed.no_weight(metrics))  # every process reduces the same names
        if counts:
            examples += len(group)
            tokens += float(batch.get("num_tokens", 0))
    lr = scheduler.get_last_lr()[0]
    grad_norm = zero.step(model) if engine else _clip_and_step(model, params, optimizer, args, accelerator, sharded)
    scheduler.step()
    reduced = acc.reduce(accelerator)
    if accelerator.num_processes > 1:  # one process already has its counts on the host
        counts = torch.tensor([examples, tokens], dtype=torch.float64, device=accelerator.device)
        examples, tokens = accelerator.reduce(counts, reduction="sum").tolist()
    return {**reduced, "grad_norm": grad_norm, "learning_rate": lr, "_examples": examples, "_tokens": tokens}


def _clip_and_step(model: torch.nn.Module, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                   args: TrainArgs, accelerator: Any, sharded: bool) -> float:
    """Average (unless FSDP did in backward), clip, AdamW step; the gradient norm before clipping."""
    if not sharded:
        _all_reduce_grads(model, accelerator)
    # an infinite max_norm measures the norm without clipping; with sharded parameters the norm is a DTensor
    max_norm = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else float("inf")
    grad_norm = distributed.grad_norm(torch.nn.utils.clip_grad_norm_(params, max_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _finish_metrics(metrics: dict[str, Any], stage: Stage, state: TrainState, groups_in_epoch: int,
                    elapsed: float) -> dict[str, float]:
    out = _stage_metrics(stage, {k: v for k, v in metrics.items() if not k.startswith("_")})
    out["epoch"] = state.epoch + state.micro_index / max(groups_in_epoch, 1)
    out[f"{stage.example_unit}/s"] = metrics["_examples"] / elapsed
    if metrics["_tokens"]:
        out["tokens/s"] = metrics["_tokens"] / elapsed
    return out
