"""`prefalign pipeline`: stages chained through their output directories, validated up front, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers import conv, corpus, write_jsonl
from prefalign.cli import main
from prefalign.commands import config_class
from prefalign.commands.pipeline import plan, run_pipeline
from prefalign.config import PipelineConfig
from prefalign.errors import PrefalignError
from prefalign.train.metrics import read_metrics

TRAIN = {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "save_steps": 0}


def recipe(tmp_path, stages, defaults=None) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"defaults": defaults or {"disable_tqdm": True}, "stages": stages}))
    return str(path)


def full_recipe(tmp_path) -> str:
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n".join(corpus(200)) + "\n")
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv(("user", f"{i} + 1"), ("assistant", f"{i + 1}"))}
                                                 for i in range(12)])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": conv(("user", f"{i} + 1")), "chosen": conv(("assistant", f"{i + 1}")),
         "rejected": conv(("assistant", f"{i + 2}"))} for i in range(12)])
    o = tmp_path / "out"
    return recipe(tmp_path, [
        {"stage": "train-tokenizer", "dataset_name": str(txt), "vocab_size": 300, "output_dir": str(o / "tok")},
        {"stage": "init-model", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
         "output_dir": str(o / "init")},
        {"stage": "pretrain", "dataset_name": str(txt), "max_length": 64, **TRAIN, "output_dir": str(o / "pre")},
        {"stage": "sft", "dataset_name": str(chat), **TRAIN, "output_dir": str(o / "sft")},
        {"stage": "rm", "dataset_name": str(pairs), **TRAIN, "output_dir": str(o / "rm")},
        {"stage": "dpo", "dataset_name": str(pairs), **TRAIN, "output_dir": str(o / "dpo")},
    ])


def test_plan_chains_outputs(tmp_path):
    stages = plan(full_recipe(tmp_path))
    o = tmp_path / "out"
    by = {s.name: s.values for s in stages}
    assert by["init-model"]["tokenizer"] == str(o / "tok")
    assert by["pretrain"]["model_name_or_path"] == str(o / "init")
    assert by["sft"]["model_name_or_path"] == str(o / "pre")
    assert by["rm"]["model_name_or_path"] == str(o / "sft")
    assert by["dpo"]["model_name_or_path"] == str(o / "sft")  # rm does not move the policy on
    assert "ref_model_name_or_path" not in by["dpo"]  # DPO's default reference already is the SFT model
    assert by["pretrain"]["disable_tqdm"] is True and "disable_tqdm" not in by["init-model"]
    assert [s.action for s in stages] == ["run"] * 6


def _checkpoint(output_dir, step: int = 2) -> None:
    """A real checkpoint (of a stand-in model) as an interrupted stage leaves it."""
    import torch
    from safetensors.torch import save_file

    from prefalign.train.checkpoint import TrainState, save_checkpoint

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(output_dir, TrainState(global_step=step), lambda d: save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors")), opt.state_dict(),
        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))


def test_plan_resumes_from_checkpoints_and_continues_lora_adapters(tmp_path):
    _checkpoint(tmp_path / "sft")
    (tmp_path / "dpo").mkdir()
    (tmp_path / "dpo" / "metrics.jsonl").write_text("")
    stages = plan(recipe(tmp_path, [
        {"stage": "sft", "model_name_or_path": "base", "dataset_name": "d", "use_peft": True,
         "output_dir": str(tmp_path / "sft")},
        {"stage": "dpo", "dataset_name": "d", "output_dir": str(tmp_path / "dpo")}]))
    assert stages[0].action == "resume" and stages[0].values["resume_from_checkpoint"] == "latest"
    assert stages[1].action == "restart" and stages[1].values["overwrite_output_dir"] is True
    # TRL's pattern: the SFT adapter continues as DPO's policy adapter (and, frozen, its reference) on the base
    assert stages[1].values["model_name_or_path"] == "base"
    assert stages[1].values["peft_adapter_path"] == str(tmp_path / "sft")


def test_every_stage_is_validated_before_anything_runs(tmp_path, capsys):
    (tmp_path / "c.txt").write_text("some text\n")
    path = recipe(tmp_path, [{"stage": "train-tokenizer", "dataset_name": str(tmp_path / "c.txt"),
                              "output_dir": str(tmp_path / "t")},
                             {"stage": "sft", "dataset_name": "d", "output_dir": "o", "lerning_rate": 1}])
    assert main(["pipeline", path]) == 2  # the recipe as a bare argument, as README shows
    assert capsys.readouterr().err.strip() == \
        f"prefalign pipeline: error: {path} stage 2 (sft) key 'lerning_rate': unknown option (see --help for the list)"
    assert not (tmp_path / "t").exists()
    with pytest.raises(PrefalignError, match="'stage' must be one of"):
        plan(recipe(tmp_path, [{"stage": "ppo-ish", "output_dir": "o"}]))
    with pytest.raises(PrefalignError, match="output_dir is required"):
        plan(recipe(tmp_path, [{"stage": "sft"}]))


def test_a_repeated_key_in_a_recipe_is_refused(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"stages:\n  - stage: sft\n    output_dir: {tmp_path / 'o'}\n    max_steps: 3\n"
                    "    max_steps: 30\n")
    assert main(["pipeline", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (f"prefalign pipeline: error: {path}:5: invalid YAML (duplicate key "
                                               "'max_steps' (first on line 4))")


@pytest.mark.slow
def test_full_pipeline_runs_then_skips_finished_stages(tmp_path, capsys):
    path = full_recipe(tmp_path)
    run_pipeline(PipelineConfig(recipe=path))
    o = tmp_path / "out"
    for stage in ("pre", "sft", "rm", "dpo"):
        assert len([r for r in read_metrics(o / stage / "metrics.jsonl") if "loss" in r]) >= 1
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(o / "rm").config.num_labels == 1
    capsys.readouterr()
    before = (o / "dpo" / "metrics.jsonl").read_text()
    stages = run_pipeline(PipelineConfig(recipe=path))
    assert [s.action for s in stages] == ["skip"] * 6
    assert (o / "dpo" / "metrics.jsonl").read_text() == before


def _files(tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv(("user", "1 + 1"), ("assistant", "2"))}])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "1 + 1", "chosen": "2", "rejected": "3"}])
    return chat, pairs


def _finish(stage) -> None:
    """Leave what a finished run of `stage` leaves: final weights and its recorded config."""
    from prefalign.train.run_dir import config_record

    out = Path(stage.config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.safetensors").write_bytes(b"weights")
    (out / "prefalign_config.json").write_text(json.dumps(config_record(stage.config)))


def test_an_edited_recipe_is_not_skipped_silently(tmp_path, tiny_model_dir):
    chat, pairs = _files(tmp_path)
    stages = [{"stage": "sft", "model_name_or_path": str(tiny_model_dir), "dataset_name": str(chat), **TRAIN,
               "output_dir": str(tmp_path / "sft")},
              {"stage": "dpo", "dataset_name": str(pairs), **TRAIN, "output_dir": str(tmp_path / "dpo")}]
    for st in plan(recipe(tmp_path, stages)):
        _finish(st)
    assert [s.action for s in plan(recipe(tmp_path, stages))] == ["skip", "skip"]
    stages[1]["beta"] = 0.2
    path = recipe(tmp_path, stages)
    with pytest.raises(PrefalignError) as e:
        plan(path)
    assert str(e.value) == (f"{path} stage 2 (dpo): {tmp_path / 'dpo'} holds this stage's result, but the recipe "
                            "changed beta 0.1 -> 0.2 since it ran; pass --rerun_changed to run it again (or restore "
                            "the recipe)")
    rerun = plan(path, rerun_changed=True)
    assert [s.action for s in rerun] == ["skip", "rerun"] and rerun[1].values["overwrite_output_dir"] is True
    stages[1].pop("beta")
    stages[0]["max_steps"] = 5  # the SFT stage changed: DPO, which starts from it, is stale too
    assert [s.action for s in plan(recipe(tmp_path, stages), rerun_changed=True)] == ["rerun", "rerun"]
    with pytest.raises(PrefalignError, match=r"stage 1 \(sft\): .* the recipe changed max_steps 3 -> 5"):
        plan(recipe(tmp_path, stages))


def test_duplicate_or_nested_output_dirs_are_refused_when_planning(tmp_path):
    chat, pairs = _files(tmp_path)
    for second in (tmp_path / "out", tmp_path / "out" / "dpo"):
        path = recipe(tmp_path, [
            {"stage": "sft", "model_name_or_path": "m", "dataset_name": str(chat), "output_dir": str(tmp_path / "out")},
            {"stage": "dpo", "dataset_name": str(pairs), "output_dir": str(second)}])
        with pytest.raises(PrefalignError, match=r"stage 2 \(dpo\): output_dir .* (is also stage 1 \(sft\)'s; each "
                                                 r"stage needs its own|are nested)"):
            plan(path)


def test_every_training_command_is_a_stage_and_rl_stages_chain(tmp_path):
    from prefalign.commands import COMMANDS
    from prefalign.commands.pipeline import STAGES

    trains = [n for n in COMMANDS if "resume_from_checkpoint" in config_class(n).__dataclass_fields__]
    assert set(trains) <= set(STAGES), "a training command without a pipeline stage: add its line to STAGES"
    chat, pairs = _files(tmp_path)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "1 + 1"}])
    o = tmp_path / "o"
    by = {s.name: s.values for s in plan(recipe(tmp_path, [
        {"stage": "sft", "model_name_or_path": "m", "dataset_name": str(chat), "output_dir": str(o / "sft")},
        {"stage": "rm", "dataset_name": str(pairs), "output_dir": str(o / "rm")},
        {"stage": "grpo", "dataset_name": str(prompts), "reward_funcs": ["length:5"], "output_dir": str(o / "grpo")},
        {"stage": "rloo", "dataset_name": str(prompts), "output_dir": str(o / "rloo")},
        {"stage": "ppo", "dataset_name": str(prompts), "output_dir": str(o / "ppo")}]))}
    assert by["rm"]["model_name_or_path"] == by["grpo"]["model_name_or_path"] == str(o / "sft")
    assert "reward_model_name_or_path" not in by["grpo"]  # it names its own reward functions
    assert by["rloo"]["model_name_or_path"] == str(o / "grpo") and by["rloo"]["reward_model_name_or_path"] == str(o / "rm")
    assert by["ppo"]["model_name_or_path"] == str(o / "rloo") and by["ppo"]["reward_model_name_or_path"] == str(o / "rm")


def test_planning_checks_data_outputs_and_each_stages_own_config(tmp_path, tiny_model_dir):
    chat, pairs = _files(tmp_path)
    first = {"stage": "sft", "model_name_or_path": str(tiny_model_dir), "dataset_name": str(chat),
             "output_dir": str(tmp_path / "sft")}
    cases = [
        ({"dataset_name": str(tmp_path / "missing.jsonl")},
         f"stage 2 (dpo) key 'dataset_name': no such file or directory ({tmp_path / 'missing.jsonl'})"),
        ({"loss_type": ["sigmoidd"]}, "stage 2 (dpo): --loss_type: unknown loss 'sigmoidd'"),
        ({"model_name_or_path": str(tiny_model_dir), "output_dir": str(tiny_model_dir)},
         f"stage 2 (dpo): --output_dir {tiny_model_dir}: is also --model_name_or_path"),
        ({"model_name_or_path": str(tmp_path / "nope")},
         f"stage 2 (dpo) key 'model_name_or_path': no such directory ({tmp_path / 'nope'})"),
    ]
    for change, message in cases:
        path = recipe(tmp_path, [first, {"stage": "dpo", "dataset_name": str(pairs), "output_dir":
                                         str(tmp_path / "dpo"), **change}])
        with pytest.raises(PrefalignError) as e:
            plan(path)
        assert str(e.value).startswith(f"{path} {message}"), str(e.value)
    grpo = {"stage": "grpo", "dataset_name": str(pairs), "reward_funcs": [f"{tmp_path / 'rewards.py'}:fn"],
            "output_dir": str(tmp_path / "grpo")}
    with pytest.raises(PrefalignError, match=r"stage 2 \(grpo\) key 'reward_funcs': no such file"):
        plan(recipe(tmp_path, [first, grpo]))
    assert not (tmp_path / "sft").exists()


def test_read_only_output_dir_is_refused_when_planning(tmp_path):
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        chat, _ = _files(tmp_path)
        path = recipe(tmp_path, [{"stage": "sft", "model_name_or_path": "m", "dataset_name": str(chat),
                                  "output_dir": str(ro / "sft")}])
        with pytest.raises(PrefalignError) as e:
            plan(path)
        assert str(e.value) == (f"{path} stage 1 (sft): --output_dir {ro / 'sft'}: is not writable (Read-only file "
                                f"system in {ro})")
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_a_failing_stage_is_named_in_its_error(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "chat.jsonl"
    bad.write_text('{"messages": "not a list"}\n')
    path = recipe(tmp_path, [{"stage": "sft", "model_name_or_path": str(tiny_model_dir), "dataset_name": str(bad),
                              **TRAIN, "output_dir": str(tmp_path / "sft")}])
    assert main(["pipeline", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"prefalign pipeline: error: {path} stage 1 (sft): {bad}:1"), err
    assert "\n" not in err


@pytest.mark.slow
def test_an_rl_stage_runs_in_a_pipeline(tmp_path, tiny_model_dir):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": conv(("user", f"what is {a} + 1"))}
                                                        for a in range(4)])
    path = recipe(tmp_path, [{"stage": "grpo", "model_name_or_path": str(tiny_model_dir), "dataset_name": str(prompts),
                              "reward_funcs": ["length:5"], "num_generations": 2, "per_device_train_batch_size": 4,
                              "max_completion_length": 4, "max_steps": 1, "logging_steps": 1, "save_steps": 0,
                              "output_dir": str(tmp_path / "grpo")}])
    run_pipeline(PipelineConfig(recipe=path))
    assert [r["step"] for r in read_metrics(tmp_path / "grpo" / "metrics.jsonl") if "reward" in r] == [1]
    assert [s.action for s in run_pipeline(PipelineConfig(recipe=path))] == ["skip"]
