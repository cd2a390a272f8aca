"""A run's output directory: checked before anything heavy, prepared when training starts, and what it records.

Before anything loads (`check_output_dir`): the directory must be writable and must not be (or hold) one of the run's
inputs; an earlier run there is refused unless it is resumed or overwritten; a resume is refused when its checkpoint
cannot be loaded or was trained on other data, batches or seed (`check_resume`; `--ignore_data_skip` consents and
restarts the data), and other changed settings are named. When training starts (`prepare_output_dir`): leftovers of
killed writers are cleared, an overwritten run is moved aside whole (`train.files.retire`; deleted after the new run's
first save), and the configs are written: the new one, and the one it replaces when a resume changed settings.
`prefalign_run.json` records what the run really used: its command, base model and reference (read by eval), and
what a GGUF base's weights were dequantized from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefalign.errors import PrefalignError
from prefalign.train.checkpoint import (
    CONFIG_FILE,
    STATE_FILE,
    WEIGHTS,
    list_checkpoints,
    resolve_checkpoint,
    resume_advice,
)
from prefalign.train.files import remove_stale, retire

RUN_FILE = "prefalign_run.json"
FINAL_WEIGHTS = WEIGHTS  # a finished run's weights are named as a checkpoint's
# What marks a directory as holding an earlier run, finished or not.
RUN_MARKERS = (*FINAL_WEIGHTS, "config.json", "adapter_config.json", "metrics.jsonl")
# Everything a run of ours writes into output_dir (an overwrite moves these aside; other files stay where they are).
_OURS = re.compile(r"^(checkpoint-\d+|metrics\.jsonl|prefalign_.*\.json|config\.json|generation_config\.json|"
                   r"adapter_config\.json|README\.md|.*\.safetensors|.*\.safetensors\.index\.json|tokenizer.*|"
                   r"special_tokens_map\.json|chat_template\.jinja|vocab\.json|merges\.txt|added_tokens\.json|"
                   r"merged|value_model|.*\.png)$")
# Flags whose value is (or names) an input of the run; output_dir must be none of them.
_INPUTS = ("model_name_or_path", "ref_model_name_or_path", "peft_adapter_path", "tokenizer_name_or_path",
           "reward_model_name_or_path", "value_model_name_or_path", "dataset_name", "eval_dataset_name")
# Changes that move what the checkpoint's data position (epoch, micro-batch) points at: refused on resume unless
# --ignore_data_skip. The data, how rows become examples, the micro-batch size, the shuffling seed, what groups a step.
DATA_POSITION = frozenset({
    "dataset_name", "dataset_config", "dataset_split", "eval_split_ratio", "skip_invalid_rows", "prompt_column",
    "prompt_template", "system_prompt", "chat_template", "chosen_column", "rejected_column", "max_length",
    "max_prompt_length", "max_completion_length", "truncation_mode", "tokenizer_name_or_path",
    "dataset_text_field", "per_document_attention", "packing", "max_tokens_per_batch", "per_device_train_batch_size",
    "seed", "num_generations", "num_iterations", "num_ppo_epochs", "num_mini_batches",
})
# Flags that change nothing a checkpoint holds or how training continues.
_NOT_COMPARED = frozenset({"output_dir", "resume_from_checkpoint", "overwrite_output_dir", "ignore_data_skip",
                           "logging_steps", "save_steps", "save_total_limit", "disable_tqdm", "report_to",
                           "per_device_eval_batch_size"})


def config_record(cfg: Any) -> dict[str, Any]:
    """The config as JSON values (what prefalign_config.json holds)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _where(cfg: Any) -> str:
    return f"--output_dir {cfg.output_dir}"


def _resolved(path: str) -> Path | None:
    p = Path(path).expanduser()
    return p.resolve() if p.exists() else None


def refuse_inputs(cfg: Any, out: Path) -> None:
    """output_dir must not be an input of the run, nor (when it will be overwritten) hold one."""
    target = out.resolve()
    for flag in _INPUTS:
        value = getattr(cfg, flag, None)
        source = _resolved(value) if isinstance(value, str) and value else None
        if source is None:
            continue
        if source == target:
            raise PrefalignError(f"is also --{flag}: the run would write over its own input; choose another directory",
                                 _where(cfg))
        if cfg.overwrite_output_dir and target in source.parents and _OURS.match(source.relative_to(target).parts[0]):
            raise PrefalignError(f"holds --{flag} {value}, which --overwrite_output_dir would clear; choose another "
                                 "directory", _where(cfg))


def check_writable(out: Path, where: str) -> None:
    """One line when `out` (or, if it does not exist yet, the directory it would be made in) cannot be written."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".prefalign-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PrefalignError(f"is not writable ({e.strerror or e}{'' if existing == out else f' in {existing}'})",
                             where) from None


def check_output_dir(cfg: Any, note: Callable[[str], None] = print) -> Path | None:
    """A new run never overwrites what an earlier run left, unless asked to; returns the checkpoint to resume."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise PrefalignError("exists and is not a directory", _where(cfg))
    refuse_inputs(cfg, out)
    check_writable(out, _where(cfg))
    if cfg.resume_from_checkpoint:
        ckpt = resolve_checkpoint(cfg.resume_from_checkpoint, out, note)
        check_resume(cfg, ckpt, note)
        return ckpt
    if cfg.overwrite_output_dir or not out.is_dir():
        return None
    earlier = [m for m in RUN_MARKERS if (out / m).exists()] + [p.name for p in list_checkpoints(out)][:1]
    if not earlier:
        return None
    if list_checkpoints(out):
        advice = resume_advice(out).split(": ", 1)[-1]
        raise PrefalignError(f"already holds an earlier run ({earlier[0]}); {advice}, or pass --overwrite_output_dir "
                             "to replace it, or choose another directory", _where(cfg))
    raise PrefalignError(f"already holds an earlier run ({earlier[0]}) with no checkpoint to resume; pass "
                         "--overwrite_output_dir to replace it, or choose another directory", _where(cfg))


def _recorded(ckpt: Path) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(the config the checkpoint was trained with, its trainer state). Checkpoints of older versions carry no
    config: the run directory's is the best record then."""
    state = json.loads((ckpt / STATE_FILE).read_text())
    for candidate in (ckpt / CONFIG_FILE, ckpt.parent / CONFIG_FILE):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text()), state
            except json.JSONDecodeError:
                continue
    return None, state


def _comparable(key: str, value: Any) -> Any:
    if isinstance(value, str) and (key.endswith(("_path", "dataset_name")) or key == "chat_template"):
        resolved = _resolved(value)
        return str(resolved) if resolved is not None else value
    return value


def changed_settings(recorded: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (recorded, now)} for the settings that differ (keys one side lacks, e.g. from another version, are
    not compared)."""
    return {k: (recorded[k], v) for k, v in now.items() if k in recorded and k not in _NOT_COMPARED
            and _comparable(k, recorded[k]) != _comparable(k, v)}


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())


def _command(config_class: str) -> str:
    return config_class.removesuffix("Config").lower()


def check_resume(cfg: Any, ckpt: Path, note: Callable[[str], None] = print) -> None:
    """Refuse a resume whose checkpoint belongs to another command, or whose data position no longer applies
    (unless --ignore_data_skip); name the other changed settings."""
    recorded, state = _recorded(ckpt)
    kind = state.get("config_class")
    if kind and kind != type(cfg).__name__:
        raise PrefalignError(f"was written by prefalign {_command(kind)}, not {_command(type(cfg).__name__)}",
                             f"--resume_from_checkpoint {ckpt}")
    if recorded is None:
        note(f"{ckpt} records no config: the flags cannot be compared with the run that wrote it")
        return
    changes = changed_settings(recorded, config_record(cfg))
    position = {k: v for k, v in changes.items() if k in DATA_POSITION}
    if position and not getattr(cfg, "ignore_data_skip", False):
        raise PrefalignError(
            f"{ckpt.name} was trained with {describe(position)}: its place in the data does not apply to the new "
            "settings. Resume with the same values, or pass --ignore_data_skip to continue its weights and optimizer "
            "on the data from the start", f"--resume_from_checkpoint {cfg.resume_from_checkpoint}")
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if state.get("num_processes", processes) != processes:
        changes["processes"] = (state["num_processes"], processes)
    rest = {k: v for k, v in changes.items() if k not in DATA_POSITION}
    if rest:
        note(f"Resuming {ckpt.name} with changed settings: {describe(rest)}; the run will not repeat the "
             "uninterrupted one")


def _earlier_items(out: Path, run_name: str) -> list[str]:
    return sorted(p.name for p in out.iterdir() if _OURS.match(p.name) or p.name == run_name)


def reference_of(cfg: Any) -> dict[str, Any]:
    """The reference this run compares the policy with, in the order model.reference.build_reference picks it:
    --ref_model_name_or_path; else the --peft_adapter_path adapter (frozen) on the base; else the starting model
    (a frozen copy, or the base with the new adapter disabled: the same weights). With --sync_ref_model the reference
    moved during training: the record says so ("synced")."""
    if getattr(cfg, "ref_model_name_or_path", None):
        reference = {"model": cfg.ref_model_name_or_path}
    elif getattr(cfg, "peft_adapter_path", None):
        reference = {"model": cfg.model_name_or_path, "adapter": cfg.peft_adapter_path}
    else:
        reference = {"model": getattr(cfg, "model_name_or_path", None)}
    if getattr(cfg, "sync_ref_model", False):  # TR-DPO: this is where the reference started, not where it ended
        reference["synced"] = True
    return reference


def prepare_output_dir(cfg: Any, run_name: str, resumed_from: Path | None = None,
                       note: Callable[[str], None] = print, weights_from: str | None = None) -> None:
    """Main process, when training starts: create output_dir, clear what killed writers left, retire an overwritten
    run, write the config (keeping the previous one when a resume changed it) and the run record (with
    `weights_from`, what the base model's weights were converted from: a GGUF file's quantization)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    config_file = out / CONFIG_FILE
    record = config_record(cfg)
    if cfg.overwrite_output_dir and not cfg.resume_from_checkpoint:
        aside = retire(out, _earlier_items(out, run_name))
        if aside is not None:
            note(f"--overwrite_output_dir: the earlier run in {out} was moved to {aside.name}; it is deleted once "
                 "this run has saved a checkpoint or its model")
    elif cfg.resume_from_checkpoint and config_file.is_file():
        try:
            before = json.loads(config_file.read_text())
        except json.JSONDecodeError:
            before = None
        if before is not None and changed_settings(before, record):
            step = resumed_from.name.rsplit("-", 1)[-1] if resumed_from is not None else "resume"
            kept = out / f"prefalign_config.until-step-{step}.json"
            os.replace(config_file, kept)
            note(f"the config of the run before this resume is kept in {kept.name}")
    config_file.write_text(json.dumps(record, indent=2))
    run = {"command": run_name, "base_model": getattr(cfg, "model_name_or_path", None),
           "reference": reference_of(cfg)}
    if weights_from:
        run["weights_from"] = weights_from
    (out / RUN_FILE).write_text(json.dumps(run, indent=2))


def read_run_record(output_dir: str | Path) -> dict[str, Any]:
    """The run record in `output_dir` ({} when there is none or it cannot be read)."""
    try:
        record = json.loads((Path(output_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
