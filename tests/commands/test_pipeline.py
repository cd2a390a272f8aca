"""`prefalign pipeline`: stages chained through their output directories, validated up front, resumable."""

from __future__ import annotations

import pytest
import yaml

from helpers import conv, corpus, write_jsonl
from prefalign.cli import main
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


def test_plan_resumes_from_checkpoints_and_continues_lora_adapters(tmp_path):
    ckpt = tmp_path / "sft" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
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
    path = recipe(tmp_path, [{"stage": "train-tokenizer", "dataset_name": "c.txt", "output_dir": str(tmp_path / "t")},
                             {"stage": "sft", "dataset_name": "d", "output_dir": "o", "lerning_rate": 1}])
    assert main(["pipeline", path]) == 2  # the recipe as a bare argument, as README shows
    assert capsys.readouterr().err.strip() == \
        f"prefalign pipeline: error: {path} stage 2 (sft) key 'lerning_rate': unknown option (see --help for the list)"
    assert not (tmp_path / "t").exists()
    with pytest.raises(PrefalignError, match="'stage' must be one of"):
        plan(recipe(tmp_path, [{"stage": "ppo-ish", "output_dir": "o"}]))
    with pytest.raises(PrefalignError, match="output_dir is required"):
        plan(recipe(tmp_path, [{"stage": "sft"}]))


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
