"""`prefalign pipeline --recipe recipe.yaml`: run a YAML list of stages, each one's output feeding the next.

A recipe is a list of stages (at top level, or under `stages:`), each a mapping with `stage:` (one of
train-tokenizer, init-model, pretrain, sft, rm, dpo) and that command's flags, plus an optional top-level
`defaults:` mapping applied to every stage whose command has those flags (a stage's own value wins):

    defaults: {disable_tqdm: true, logging_steps: 10}
    stages:
      - {stage: train-tokenizer, dataset_name: corpus.txt, vocab_size: 6400, output_dir: out/tokenizer}
      - {stage: init-model, hidden_size: 512, num_hidden_layers: 8, output_dir: out/init}
      - {stage: pretrain, dataset_name: corpus.txt, output_dir: out/pretrain}
      - {stage: sft, dataset_name: chat.jsonl, output_dir: out/sft}
      - {stage: dpo, dataset_name: pairs.jsonl, output_dir: out/dpo}

Chaining, for every flag the stage leaves unset: the tokenizer of train-tokenizer becomes init-model's
`tokenizer`; the model of the latest init-model / pretrain / sft / dpo stage becomes `model_name_or_path` of
the next pretrain / sft / rm / dpo stage (an rm stage does not move the policy on); the SFT model becomes DPO's
`ref_model_name_or_path` when DPO's policy is another model. A LoRA stage's adapter continues into DPO as
`peft_adapter_path` on its base model; other stages need full weights (`merge_adapter: true`).

Resumable stage by stage: a stage whose output_dir already holds its final result is skipped, one with
checkpoints resumes from the latest, and one that left only logs starts again. Every stage's flags are checked
before the first stage runs, so a typo in the last stage costs no training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prefalign.argparsing import make_config
from prefalign.commands import config_class, runner
from prefalign.config import PipelineConfig
from prefalign.errors import PrefalignError
from prefalign.train.checkpoint import list_checkpoints
from prefalign.train.setup import is_finished

STAGES = ("train-tokenizer", "init-model", "pretrain", "sft", "rm", "dpo")
POLICY_STAGES = ("init-model", "pretrain", "sft", "dpo")  # their output is the next stage's policy


@dataclass
class PlannedStage:
    index: int
    name: str
    values: dict[str, Any]
    action: str  # run, resume, restart, skip
    where: str
    config: Any = None  # the command's config, built (and so checked) when planning


def read_recipe(path: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(stages, defaults) from the YAML file, with errors naming the file."""
    p = Path(path)
    if not p.is_file():
        raise PrefalignError("no such file", f"--recipe {path}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise PrefalignError(f"invalid YAML ({getattr(e, 'problem', e)})",
                             f"{path}:{mark.line + 1}" if mark else path) from None
    defaults: dict[str, Any] = {}
    if isinstance(data, dict):
        defaults = data.get("defaults") or {}
        data = data.get("stages")
    if not isinstance(data, list) or not data:
        raise PrefalignError("expected a non-empty list of stages (at top level or under 'stages:')", path)
    if not isinstance(defaults, dict):
        raise PrefalignError("'defaults' must be a mapping of flags", path)
    for i, entry in enumerate(data, start=1):
        if not isinstance(entry, dict) or entry.get("stage") not in STAGES:
            got = entry.get("stage") if isinstance(entry, dict) else entry
            raise PrefalignError(f"stage {i}: 'stage' must be one of {', '.join(STAGES)}, got {got!r}", path)
        if not entry.get("output_dir"):
            raise PrefalignError(f"stage {i} ({entry['stage']}): output_dir is required", path)
    return data, defaults


def _finished(name: str, output_dir: Path) -> bool:
    return is_finished(output_dir, "tokenizer" if name == "train-tokenizer" else "model")


def _policy_source(output_dir: Path, where: str) -> dict[str, str]:
    """Flags that make the next stage start from this stage's output."""
    if (output_dir / "adapter_config.json").is_file() and not (output_dir / "config.json").is_file():
        if (output_dir / "merged").is_dir():
            return {"model_name_or_path": str(output_dir / "merged")}
        base = json.loads((output_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        return {"model_name_or_path": base, "peft_adapter_path": str(output_dir), "_adapter_of": where}
    return {"model_name_or_path": str(output_dir)}


def plan(recipe: str) -> list[PlannedStage]:
    """Resolve chaining and skip/resume decisions, and validate every stage's flags."""
    entries, defaults = read_recipe(recipe)
    tokenizer_dir: str | None = None
    policy: dict[str, str] = {}
    sft_model: str | None = None
    out: list[PlannedStage] = []
    for i, entry in enumerate(entries, start=1):
        name = entry["stage"]
        where = f"{recipe} stage {i} ({name})"
        fields = set(config_class(name).__dataclass_fields__)
        values = {k: v for k, v in defaults.items() if k in fields}
        values.update({k: v for k, v in entry.items() if k != "stage"})
        if name == "init-model" and "tokenizer" not in values and tokenizer_dir:
            values["tokenizer"] = tokenizer_dir
        if name in ("pretrain", "sft", "rm", "dpo") and "model_name_or_path" not in values and policy:
            if "peft_adapter_path" in policy and name != "dpo":
                raise PrefalignError(f"{policy['_adapter_of']} saves a LoRA adapter; set merge_adapter: true there "
                                     "so that this stage can start from full weights", where)
            values.update({k: v for k, v in policy.items() if not k.startswith("_")})
        if name == "dpo" and sft_model and "ref_model_name_or_path" not in values \
                and values.get("model_name_or_path") != sft_model and "peft_adapter_path" not in values:
            values["ref_model_name_or_path"] = sft_model
        output_dir = Path(values["output_dir"])
        action = "run"
        if _finished(name, output_dir):
            action = "skip"
        elif name not in ("train-tokenizer", "init-model") and "resume_from_checkpoint" not in values:
            if list_checkpoints(output_dir):
                values["resume_from_checkpoint"], action = "latest", "resume"
            elif output_dir.is_dir() and any(output_dir.iterdir()):
                values["overwrite_output_dir"], action = True, "restart"
        config = make_config(config_class(name), values, source=where)  # every flag checked before anything runs
        if name == "train-tokenizer":
            tokenizer_dir = str(output_dir)
        elif name in POLICY_STAGES:
            policy = _next_policy(name, values, where)
            if name == "sft":
                sft_model = policy["model_name_or_path"]
        out.append(PlannedStage(i, name, values, action, where, config))
    return out


def _next_policy(name: str, values: dict[str, Any], where: str) -> dict[str, str]:
    """Flags that start the next stage from this one's output: read from disk when the stage has finished,
    else predicted from its flags (a LoRA stage saves an adapter, or with merge_adapter also merged/)."""
    output_dir = Path(values["output_dir"])
    if _finished(name, output_dir):
        return _policy_source(output_dir, where)
    if values.get("use_peft") and values.get("merge_adapter"):
        return {"model_name_or_path": str(output_dir / "merged")}
    if values.get("use_peft"):
        return {"model_name_or_path": str(values.get("model_name_or_path", "")),
                "peft_adapter_path": str(output_dir), "_adapter_of": where}
    return {"model_name_or_path": str(output_dir)}


def run_pipeline(cfg: PipelineConfig) -> list[PlannedStage]:
    """Plan, then run each stage that is not finished, in order."""

    if not cfg.recipe:
        raise PrefalignError("is required (the YAML list of stages)", "--recipe")
    stages = plan(cfg.recipe)
    for st in stages:
        print(f"[{st.index}/{len(stages)}] {st.name} → {st.values['output_dir']}: {st.action}")
    if cfg.dry_run:
        for st in stages:
            print(f"  stage {st.index} ({st.name}): " + json.dumps(st.values, default=str))
        return stages
    for st in stages:
        if st.action == "skip":
            continue
        runner(st.name)(st.config)
    return stages


def run_command(cfg: PipelineConfig) -> None:
    """`prefalign pipeline --recipe FILE`."""
    stages = run_pipeline(cfg)
    if not cfg.dry_run:
        print(f"pipeline: {len(stages)} stages done; final output in {stages[-1].values['output_dir']}")
