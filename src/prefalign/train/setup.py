"""What every training command does around the loop, written once: check the output directory before anything
heavy happens, set up Accelerate, seeds and the tokenizer (`open_session`), load the policy to train, print the
start-of-run block (`train.runinfo`), and after the loop save the final model atomically (`train_and_save`) and
print one closing line (`print_summary`)."""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs, set_seed

from prefalign.config import ModelArgs, TrainArgs
from prefalign.data.templates import resolve_chat_template
from prefalign.errors import PrefalignError
from prefalign.model.checks import check_adapter_base, check_vocab
from prefalign.model.load import load_policy, load_processing, save_model
from prefalign.model.weights import is_main_process, load_weights_into
from prefalign.train import zero
from prefalign.train.distributed import check_launch, shard_plan
from prefalign.train.files import drop_retired, publish_into, staged, staging_dir
from prefalign.train.loop import LoopPlan, LoopResult, Stage, train_loop
from prefalign.train.run_dir import FINAL_WEIGHTS, check_output_dir, prepare_output_dir, read_run_record
from prefalign.train.runinfo import RunFacts, start_block, summary_numbers
from prefalign.train.signals import Terminated


def is_finished(output_dir: str | Path, what: str = "model") -> bool:
    """Whether `output_dir` holds a finished model (or, with what="tokenizer", a saved tokenizer)."""
    out = Path(output_dir)
    if what == "tokenizer":
        return (out / "tokenizer.json").is_file()
    return any((out / name).is_file() for name in FINAL_WEIGHTS)


def make_accelerator(args: TrainArgs) -> Accelerator:
    use_deepspeed = zero.requested(args)
    check_launch(use_deepspeed)
    mixed = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
    log_with = [r for r in args.report_to if r != "none"] or None
    # Without cpu=True, Accelerate ignores a torchrun process group on a machine with no accelerator.
    cpu_only = not (torch.cuda.is_available() or torch.backends.mps.is_available()
                    or (hasattr(torch, "xpu") and torch.xpu.is_available()))
    # Accelerate keeps its settings in a process-wide singleton; a second run in the same process (the Python API,
    # `prefalign pipeline`) with another mixed precision would be refused. Reset those settings but keep the process
    # group (PartialState), which must outlive the run under torchrun -- unless it was destroyed already: then
    # PartialState is reset too, and starts a new one.
    alive = torch.distributed.is_available() and torch.distributed.is_initialized()
    AcceleratorState._reset_state(reset_partial_state=not alive)
    if use_deepspeed:
        # cpu=True would drop DeepSpeed silently; without a GPU, Accelerate picks no backend unless told (gloo)
        kwargs = [InitProcessGroupKwargs(backend="gloo")] if cpu_only else []
        accelerator = Accelerator(mixed_precision=mixed, log_with=log_with, project_dir=args.output_dir,
                                  deepspeed_plugin=zero.make_plugin(args), kwargs_handlers=kwargs)
        zero.after_accelerator(accelerator)
    else:
        accelerator = Accelerator(mixed_precision=mixed, log_with=log_with, project_dir=args.output_dir, cpu=cpu_only)
    set_seed(args.seed)
    return accelerator


@dataclass
class Session:
    """A training command once set up: its Accelerator, its tokenizer (chat template resolved), for a
    vision-language model its processor (whose tokenizer `tokenizer` is), and the checkpoint it resumes from
    (checked before anything was loaded)."""

    accelerator: Accelerator
    tokenizer: Any
    processor: Any = None
    checkpoint: Path | None = None
    started: float = field(default_factory=time.perf_counter)  # for the closing line's total wall time

    @property
    def saved_processing(self) -> Any:
        """What is saved beside the weights: the processor (tokenizer included) or the tokenizer."""
        return self.processor if self.processor is not None else self.tokenizer

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def print(self, *args: Any) -> None:
        self.accelerator.print(*args)


def open_session(cfg: Any) -> Session:
    """The prologue every training command shares, after its own config checks: output directory, Accelerate and
    seeds, tokenizer and chat template."""
    checkpoint = check_output_dir(cfg, note=_main_print)
    check_adapter_base(cfg)  # before the data is read: a wrong base is a flag mistake
    accelerator = make_accelerator(cfg)
    tokenizer, processor = load_processing(cfg)
    resolve_chat_template(tokenizer, getattr(cfg, "chat_template", None))  # pretraining reads raw text
    if processor is not None:
        processor.chat_template = tokenizer.chat_template  # saved with the model: the template trained with
    return Session(accelerator, tokenizer, processor, checkpoint)


def _main_print(text: str) -> None:
    if is_main_process():
        print(text)


def trainable_policy(cfg: ModelArgs, session: Session, *, no_dropout: bool = False) -> torch.nn.Module:
    """The policy to train (full weights, LoRA, continued adapter or QLoRA) on the session's device; with
    `no_dropout` every dropout is zeroed (see `disable_dropout`)."""
    model = load_policy(cfg, gradient_checkpointing=getattr(cfg, "gradient_checkpointing", False))
    check_vocab(model, session.tokenizer, vocab_flag(cfg))
    model = model.to(session.device)
    if no_dropout:
        disable_dropout(model)
    return model


def vocab_flag(cfg: ModelArgs) -> str:
    """The flag a tokenizer/embedding size mismatch is blamed on: the tokenizer's when one is given apart."""
    return "--tokenizer_name_or_path" if cfg.tokenizer_name_or_path else "--model_name_or_path"


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout (TRL's default for preference and RL training): nn.Dropout modules, LoRA's included, and
    attention-dropout rates stored as floats, so that policy and reference agree exactly before the first update."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def start_run(args: TrainArgs, accelerator: Accelerator, run_name: str, resumed_from: Path | None = None,
              weights_from: str | None = None) -> None:
    """Prepare output_dir (`train.run_dir.prepare_output_dir`: stale leftovers, an overwritten run moved aside, the
    config and run record written), then start trackers."""
    if accelerator.is_main_process:
        prepare_output_dir(args, run_name, resumed_from, note=accelerator.print, weights_from=weights_from)
    if accelerator.log_with:
        accelerator.init_trackers(run_name, config={k: str(v) for k, v in dataclasses.asdict(args).items()})
    accelerator.wait_for_everyone()


def save_final(output_dir: str | Path, write: Callable[[Path], None]) -> None:
    """Write the final model into a temporary directory, then move its files into output_dir. Every process calls
    this (`write` may gather sharded weights); the main process writes. A failure or interrupt leaves no partial
    files; a full disk is one line naming output_dir."""
    out = Path(output_dir)
    main = is_main_process()
    tmp = staging_dir(out, "final", main)
    with staged(tmp, str(out), main):
        write(tmp)
        if main:
            publish_into(tmp, out)
    if main:
        drop_retired(out)


def train_and_save(stage: Stage, model: torch.nn.Module, cfg: Any, session: Session, run_name: str, facts: RunFacts,
                   *, final_model: Any = None, save: Callable[[Path], None] | None = None,
                   load: Callable[[Path], None] | None = None) -> LoopResult:
    """The common tail of every training command: start the run (output_dir, config, trackers), the start-of-run
    block (`facts` from the stage's builder), the loop with Hugging Face-format checkpoints, then the final model
    (`final_model`, default `model`) and tokenizer saved atomically into output_dir by the main process."""
    accelerator, tokenizer = session.accelerator, session.saved_processing
    plan = shard_plan(accelerator)
    zero3 = zero.stage_of(accelerator) == 3
    if (plan is not None or zero3) and getattr(cfg, "merge_adapter", False) \
            and hasattr(final_model or model, "peft_config"):
        raise PrefalignError(f"cannot merge a sharded ({'FSDP' if plan else 'ZeRO-3'}) model; merge the saved "
                             "adapter afterwards", "--merge_adapter")
    if zero3 and getattr(cfg, "sync_ref_model", False):
        raise PrefalignError("TR-DPO's reference update reads the policy's weights, which ZeRO-3 partitions; use "
                             "ZeRO-2 (--deepspeed zero2) or FSDP", "--sync_ref_model")
    final_model = model if final_model is None else final_model
    # A GGUF base says what its weights were dequantized from (model.gguf.load_gguf_model); peft forwards the lookup.
    start_run(cfg, accelerator, run_name, session.checkpoint, getattr(final_model, "dequantized_from", None))
    save = save or (lambda d: save_model(final_model, tokenizer, d, merge_adapter=False))
    load = load or (lambda d: load_weights_into(final_model, d))

    if zero.active(accelerator):
        facts.extra.setdefault("deepspeed", zero.describe(accelerator))

    def announce(loop_plan: LoopPlan) -> None:
        session.print(start_block(run_name, cfg, facts, model, loop_plan, accelerator.num_processes))

    result = train_loop(stage, model, cfg, accelerator, save, load, plan, checkpoint=session.checkpoint,
                        on_start=announce)
    if result.interrupted:
        raise Terminated() if result.interrupt_signal == signal.SIGTERM else KeyboardInterrupt()
    save_final(cfg.output_dir, lambda d: save_model(final_model, tokenizer, d, merge_adapter=cfg.merge_adapter))
    accelerator.wait_for_everyone()
    # end_training's tracker half: the process group outlives the run (another run in this process may follow; the
    # CLI closes it at its end, `train.distributed.close_process_group`)
    for tracker in accelerator.trackers:
        tracker.finish()
    result.wall_seconds = time.perf_counter() - session.started
    return result


def print_summary(name: str, result: LoopResult, output_dir: str, shown: tuple[str, ...],
                  what: str = "model") -> None:
    """One closing line (from the main process only): steps, the chosen metrics, throughput and wall time, where
    the result is, and what a GGUF base was dequantized from (the run record's `weights_from`)."""
    if not is_main_process():
        return
    metrics = {**result.last_metrics, **result.eval_metrics}
    values = ", ".join(f"{k}={metrics[k]:.4g}" for k in shown if k in metrics)
    speed = summary_numbers(result.tokens, result.train_seconds, result.wall_seconds)
    source = read_run_record(output_dir).get("weights_from")
    print(f"{name}: {result.state.global_step} steps, {values}; {speed}; {what} saved to {output_dir}"
          + (f" (base weights from {source})" if source else ""))
