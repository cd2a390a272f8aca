"""`prefalign pipeline --recipe recipe.yaml`: run a YAML list of stages, each one's output feeding the next.

A recipe is a list of stages (at top level, or under `stages:`), each a mapping with `stage:` (a command of
`STAGES`: train-tokenizer, init-model, pretrain, sft, rm, dpo, kto, grpo, rloo, ppo, online-dpo, distill) and that command's flags,
plus an optional top-level `defaults:` mapping applied to every stage whose command has those flags (a stage's own
value wins):

    defaults: {disable_tqdm: true, logging_steps: 10}
    stages:
      - {stage: train-tokenizer, dataset_name: corpus.txt, vocab_size: 6400, output_dir: out/tokenizer}
      - {stage: init-model, hidden_size: 512, num_hidden_layers: 8, output_dir: out/init}
      - {stage: pretrain, dataset_name: corpus.txt, output_dir: out/pretrain}
      - {stage: sft, dataset_name: chat.jsonl, output_dir: out/sft}
      - {stage: dpo, dataset_name: pairs.jsonl, output_dir: out/dpo}

Chaining, for every flag the stage leaves unset: the tokenizer of train-tokenizer becomes init-model's `tokenizer`;
the model of the latest stage that writes a policy (init-model, pretrain, sft, dpo, kto, grpo, rloo, ppo, online-dpo,
distill) becomes `model_name_or_path` of the next stage that reads one (an rm stage does not move the policy on); the
SFT model becomes DPO's / KTO's `ref_model_name_or_path` when their policy is another model; the latest rm stage's
model becomes `reward_model_name_or_path` of a grpo / rloo / ppo / online-dpo stage that names neither reward
functions nor a reward model. A LoRA stage's adapter continues into DPO or KTO as `peft_adapter_path` on its base
model; other stages need full weights (`merge_adapter: true`). A distill stage's teacher is always named
(`teacher_model_name_or_path`).

Planning checks, before the first stage runs, everything that can be checked without training: every stage's flags
and its own config checks (`check_*_config` / `resolve_*_config` of its stage module), output directories (distinct,
not nested, writable, none an input of its stage), local data files, models and reward-function files that no
earlier stage produces, and resumes (the checkpoint is readable and was trained on the same data). What cannot be
checked then: the rows inside data files, hub ids, and whatever an earlier stage will write.

Resumable stage by stage: a stage whose output_dir holds its final result is skipped if its recorded config equals
the recipe's, and stops the pipeline naming the changed keys otherwise (`--rerun_changed` runs it again, with the
stages that start from it); one with checkpoints resumes from the latest; one that left only logs starts again.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefalign.argparsing import make_config, read_yaml
from prefalign.commands import config_class, runner
from prefalign.config import PipelineConfig
from prefalign.errors import PrefalignError
from prefalign.train.checkpoint import CONFIG_FILE, list_checkpoints
from prefalign.train.run_dir import (
    changed_settings,
    check_output_dir,
    check_writable,
    config_record,
    describe,
    refuse_inputs,
)
from prefalign.train.setup import is_finished


@dataclass(frozen=True)
class StageKind:
    """How a command takes part in a recipe: its planning check and what it reads from / gives to the stages around it."""

    check: str  # "module:function" called with the stage's config when planning
    reads_policy: bool = False  # model_name_or_path from the latest policy stage
    writes_policy: bool = False  # its output is the next stage's policy
    continues_adapter: bool = False  # a LoRA policy before it continues as peft_adapter_path
    sft_reference: bool = False  # the SFT model is its reference when its policy is another model
    reads_reward_model: bool = False  # reward_model_name_or_path from the latest rm stage
    writes_reward_model: bool = False
    output: str = "model"  # what its output_dir holds when finished: "model" or "tokenizer"


# One line per command that can be a stage.
STAGES: dict[str, StageKind] = {
    "train-tokenizer": StageKind("prefalign.data.tokenizer:check_tokenizer_config", output="tokenizer"),
    "init-model": StageKind("prefalign.model.init:check_init_config", writes_policy=True),
    "pretrain": StageKind("prefalign.stages.causal_lm:check_lm_config", reads_policy=True, writes_policy=True),
    "sft": StageKind("prefalign.stages.causal_lm:check_lm_config", reads_policy=True, writes_policy=True),
    "rm": StageKind("prefalign.stages.rm:resolve_rm_config", reads_policy=True, writes_reward_model=True),
    "dpo": StageKind("prefalign.stages.dpo:resolve_dpo_config", reads_policy=True, writes_policy=True,
                     continues_adapter=True, sft_reference=True),
    "kto": StageKind("prefalign.stages.kto:resolve_kto_config", reads_policy=True, writes_policy=True,
                     continues_adapter=True, sft_reference=True),
    "grpo": StageKind("prefalign.stages.grpo:check_grpo_config", reads_policy=True, writes_policy=True,
                      reads_reward_model=True),
    "rloo": StageKind("prefalign.stages.rloo:check_rloo_config", reads_policy=True, writes_policy=True,
                      reads_reward_model=True),
    "ppo": StageKind("prefalign.stages.ppo:check_ppo_config", reads_policy=True, writes_policy=True,
                     reads_reward_model=True),
    "online-dpo": StageKind("prefalign.stages.online_dpo:check_online_dpo_config", reads_policy=True,
                            writes_policy=True, reads_reward_model=True),
    "distill": StageKind("prefalign.stages.distill:check_distill_config", reads_policy=True, writes_policy=True),
}
_DATA_FLAGS = ("dataset_name", "eval_dataset_name")
_MODEL_FLAGS = ("model_name_or_path", "ref_model_name_or_path", "tokenizer_name_or_path", "peft_adapter_path",
                "reward_model_name_or_path", "value_model_name_or_path", "teacher_model_name_or_path", "tokenizer")
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")


@dataclass
class PlannedStage:
    index: int
    name: str
    values: dict[str, Any]
    action: str  # run, resume, restart, rerun, skip
    where: str
    config: Any = None  # the command's config, built (and so checked) when planning


def read_recipe(path: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(stages, defaults) from the YAML file, with errors naming the file."""
    p = Path(path)
    if not p.is_file():
        raise PrefalignError("no such file", f"--recipe {path}")
    data = read_yaml(p)  # a repeated key is refused, not silently overwritten
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
    return is_finished(output_dir, STAGES[name].output)


def _policy_source(output_dir: Path, where: str) -> dict[str, str]:
    """Flags that make the next stage start from this stage's output."""
    if (output_dir / "adapter_config.json").is_file() and not (output_dir / "config.json").is_file():
        if (output_dir / "merged").is_dir():
            return {"model_name_or_path": str(output_dir / "merged")}
        base = json.loads((output_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        return {"model_name_or_path": base, "peft_adapter_path": str(output_dir), "_adapter_of": where}
    return {"model_name_or_path": str(output_dir)}


def _next_policy(values: dict[str, Any], where: str, finished: bool) -> dict[str, str]:
    """Flags that start the next stage from this one's output: read from disk when the stage has finished (and is
    not run again), else predicted from its flags (a LoRA stage saves an adapter, or with merge_adapter also merged/)."""
    output_dir = Path(values["output_dir"])
    if finished:
        return _policy_source(output_dir, where)
    if values.get("use_peft") and values.get("merge_adapter"):
        return {"model_name_or_path": str(output_dir / "merged")}
    if values.get("use_peft"):
        return {"model_name_or_path": str(values.get("model_name_or_path", "")),
                "peft_adapter_path": str(output_dir), "_adapter_of": where}
    return {"model_name_or_path": str(output_dir)}


class _Chain:
    """What earlier stages hand on: the tokenizer, the policy, the SFT model, the reward model."""

    def __init__(self) -> None:
        self.tokenizer: str | None = None
        self.policy: dict[str, str] = {}
        self.sft: str | None = None
        self.reward_model: str | None = None

    def fill(self, name: str, values: dict[str, Any], fields: set[str], where: str) -> None:
        kind = STAGES[name]
        if "tokenizer" in fields and "tokenizer" not in values and self.tokenizer:
            values["tokenizer"] = self.tokenizer
        if kind.reads_policy and "model_name_or_path" not in values and self.policy:
            if "peft_adapter_path" in self.policy and not kind.continues_adapter:
                raise PrefalignError(f"{self.policy['_adapter_of']} saves a LoRA adapter; set merge_adapter: true "
                                     "there so that this stage can start from full weights", where)
            values.update({k: v for k, v in self.policy.items() if not k.startswith("_")})
        if kind.sft_reference and self.sft and "ref_model_name_or_path" not in values \
                and values.get("model_name_or_path") != self.sft and "peft_adapter_path" not in values:
            values["ref_model_name_or_path"] = self.sft
        if kind.reads_reward_model and self.reward_model and not values.get("reward_model_name_or_path") \
                and not values.get("reward_funcs"):
            values["reward_model_name_or_path"] = self.reward_model

    def hand_on(self, name: str, values: dict[str, Any], where: str, finished: bool) -> None:
        kind = STAGES[name]
        if kind.output == "tokenizer":
            self.tokenizer = str(values["output_dir"])
        if kind.writes_policy:
            self.policy = _next_policy(values, where, finished)
            if name == "sft":
                self.sft = self.policy["model_name_or_path"]
        if kind.writes_reward_model:
            self.reward_model = str(values["output_dir"])


def plan(recipe: str, rerun_changed: bool = False) -> list[PlannedStage]:
    """Resolve chaining and skip/resume decisions, and check every stage as far as it can be before training."""
    entries, defaults = read_recipe(recipe)
    chain = _Chain()
    out: list[PlannedStage] = []
    for i, entry in enumerate(entries, start=1):
        name = entry["stage"]
        where = f"{recipe} stage {i} ({name})"
        fields = set(config_class(name).__dataclass_fields__)
        values = {k: v for k, v in defaults.items() if k in fields}
        values.update({k: v for k, v in entry.items() if k != "stage"})
        chain.fill(name, values, fields, where)
        _check_paths(values, out, where)
        config = make_config(config_class(name), values, source=where)  # every flag checked before anything runs
        try:
            refuse_inputs(config, Path(config.output_dir))  # before any decision: a finished input is no result
        except PrefalignError as e:
            raise PrefalignError(str(e), where) from None
        action = _decide(name, values, config, out, rerun_changed, where)
        if action != "skip":
            config = make_config(config_class(name), values, source=where)
        _check_stage(name, config, action, where)
        chain.hand_on(name, values, where, finished=action == "skip")
        out.append(PlannedStage(i, name, values, action, where, config))
    return out


def _decide(name: str, values: dict[str, Any], config: Any, earlier: list[PlannedStage], rerun_changed: bool,
            where: str) -> str:
    """run, resume, restart, rerun or skip; a finished stage whose recipe entry (or input stage) changed stops the
    plan unless `rerun_changed`. Sets the resume / overwrite flags the action needs in `values`."""
    output_dir = Path(values["output_dir"])
    trains = "resume_from_checkpoint" in config.__dataclass_fields__
    if _finished(name, output_dir):
        why = _why_stale(config, output_dir, earlier, values)
        if why is None:
            return "skip"
        if not rerun_changed:
            raise PrefalignError(f"{output_dir} holds this stage's result, but {why}; pass --rerun_changed to run it "
                                 "again (or restore the recipe)", where)
        values["overwrite_output_dir"] = True
        return "rerun"
    if trains and "resume_from_checkpoint" not in values and list_checkpoints(output_dir):
        values["resume_from_checkpoint"] = "latest"
        return "resume"
    if output_dir.is_dir() and any(output_dir.iterdir()) and "overwrite_output_dir" in config.__dataclass_fields__:
        values["overwrite_output_dir"] = True
        return "restart"
    return "run"


def _why_stale(config: Any, output_dir: Path, earlier: list[PlannedStage], values: dict[str, Any]) -> str | None:
    """Why a finished stage's result no longer matches the recipe (None: it does)."""
    for st in earlier:
        if st.action != "skip" and any(_inside(v, st.values["output_dir"]) for v in _strings(values)):
            return f"stage {st.index} ({st.name}), which it starts from, runs again"
    record = output_dir / CONFIG_FILE
    if not record.is_file():
        return None  # written before configs were recorded: nothing to compare
    try:
        recorded = json.loads(record.read_text())
    except json.JSONDecodeError:
        return f"its recorded {CONFIG_FILE} is unreadable"
    changes = changed_settings(recorded, config_record(config))
    return f"the recipe changed {describe(changes)} since it ran" if changes else None


def _strings(values: dict[str, Any]) -> list[str]:
    items = [v for k, v in values.items() if k != "output_dir"]
    return [s for v in items for s in (v if isinstance(v, list) else [v]) if isinstance(s, str)]


def _inside(value: str, directory: str) -> bool:
    p, d = Path(value).expanduser().resolve(), Path(directory).expanduser().resolve()
    return p == d or d in p.parents


def _check_paths(values: dict[str, Any], earlier: list[PlannedStage], where: str) -> None:
    """Output directories distinct and not nested; local inputs exist unless an earlier stage writes them."""
    out = Path(values["output_dir"]).expanduser().resolve()
    for st in earlier:
        other = Path(st.values["output_dir"]).expanduser().resolve()
        if other == out:
            raise PrefalignError(f"output_dir {values['output_dir']} is also stage {st.index} ({st.name})'s; "
                                 "each stage needs its own", where)
        if other in out.parents or out in other.parents:
            raise PrefalignError(f"output_dir {values['output_dir']} and stage {st.index} ({st.name})'s "
                                 f"{st.values['output_dir']} are nested; each stage needs its own directory", where)
    produced = [st.values["output_dir"] for st in earlier]
    for flag in (*_DATA_FLAGS, *_MODEL_FLAGS, "reward_funcs"):
        given = values.get(flag)
        for value in (given or []) if flag == "reward_funcs" else [given]:
            path = _local_path(flag, value)
            if path is None or path.exists() or any(_inside(str(path), d) for d in produced):
                continue
            what = "file or directory" if flag in _DATA_FLAGS else "file" if flag == "reward_funcs" else "directory"
            raise PrefalignError(f"no such {what} ({value})", f"{where} key '{flag}'")


def _local_path(flag: str, value: Any) -> Path | None:
    """The local path a flag's value names, or None for a hub id, a module name or no value."""
    if not isinstance(value, str) or not value:
        return None
    if flag == "reward_funcs":
        file = value.rsplit(":", 1)[0]
        return Path(file).expanduser() if file.endswith(".py") else None
    looks_local = value.startswith(("/", ".", "~")) or value.count("/") > 1
    if flag in _DATA_FLAGS:
        looks_local = looks_local or Path(value).suffix in _DATA_SUFFIXES
    return Path(value).expanduser() if looks_local else None


def _check_stage(name: str, config: Any, action: str, where: str) -> None:
    """The stage's own config checks and its output directory's (a resume's checkpoint included), named after the
    stage."""
    if action == "skip":
        return
    module, function = STAGES[name].check.split(":")
    try:
        getattr(importlib.import_module(module), function)(config)
        if "resume_from_checkpoint" in config.__dataclass_fields__:
            check_output_dir(config, note=lambda text: print(f"{where}: {text}"))
        else:
            check_writable(Path(config.output_dir), f"--output_dir {config.output_dir}")
    except PrefalignError as e:
        raise PrefalignError(str(e), where) from None


def run_pipeline(cfg: PipelineConfig) -> list[PlannedStage]:
    """Plan, then run each stage that is not finished, in order; a stage's error is named after the stage."""
    if not cfg.recipe:
        raise PrefalignError("is required (the YAML list of stages)", "--recipe")
    stages = plan(cfg.recipe, cfg.rerun_changed)
    for st in stages:
        print(f"[{st.index}/{len(stages)}] {st.name} → {st.values['output_dir']}: {st.action}")
    if cfg.dry_run:
        for st in stages:
            print(f"  stage {st.index} ({st.name}): " + json.dumps(st.values, default=str))
        return stages
    for st in stages:
        if st.action == "skip":
            continue
        try:
            runner(st.name)(st.config)
        except PrefalignError as e:
            raise PrefalignError(str(e), st.where) from None
        except KeyboardInterrupt:
            print(f"pipeline: interrupted in {st.where}; run the pipeline again to continue", flush=True)
            raise
        record = Path(st.config.output_dir) / CONFIG_FILE
        if not record.is_file():  # the tool stages do not write one; the next plan compares with it
            record.write_text(json.dumps(config_record(st.config), indent=2))
    return stages


def run_command(cfg: PipelineConfig) -> None:
    """`prefalign pipeline --recipe FILE`."""
    stages = run_pipeline(cfg)
    if not cfg.dry_run:
        print(f"pipeline: {len(stages)} stages done; final output in {stages[-1].values['output_dir']}")
