"""DeepSpeed settings: what the loop owns is filled in from the flags, a config that disagrees or would silently
not run DeepSpeed is a one-line error before anything is loaded or written (the 2-process runs are in
tests/e2e/test_deepspeed.py)."""

from __future__ import annotations

import json

import pytest

from helpers import conv, run_cli, write_jsonl
from prefalign.config import TrainArgs
from prefalign.errors import PrefalignError
from prefalign.train.zero import PRESETS, loop_config, read_config


def _args(**kw) -> TrainArgs:
    return TrainArgs(**{"output_dir": "unused", "per_device_train_batch_size": 2, "gradient_accumulation_steps": 3,
                        "max_grad_norm": 0.5, **kw})


def test_loop_config_fills_what_the_loop_owns():
    cfg = loop_config({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                       "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
                       "zero_optimization": {"stage": 3}}, _args(), "x.json")
    assert "train_batch_size" not in cfg
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    # the loop accumulates itself and tells DeepSpeed where each optimizer step ends
    assert cfg["gradient_accumulation_steps"] == 1
    assert cfg["gradient_clipping"] == 0.5  # DeepSpeed's own default would clip at 1.0
    assert cfg["bf16"] == {"enabled": False} and cfg["fp16"] == {"enabled": False}
    # the loop's torch AdamW, also under optimizer offload (no JIT-built DeepSpeed Adam)
    assert cfg["zero_allow_untested_optimizer"] is True and cfg["zero_force_ds_cpu_optimizer"] is False
    assert loop_config(PRESETS["zero2"], _args(max_grad_norm=0.0, bf16=True), "p")["gradient_clipping"] == 0.0
    assert loop_config(PRESETS["zero2"], _args(bf16=True), "p")["bf16"] == {"enabled": True}
    # values that agree with the flags are fine
    assert loop_config({"gradient_accumulation_steps": 3, "zero_optimization": {"stage": 2}}, _args(), "p")


@pytest.mark.parametrize(("cfg", "message"), [
    ({"zero_optimization": {"stage": 3}, "gradient_clipping": 1.0},
     "x.json: gradient_clipping is 1.0 but --max_grad_norm gives 0.5; set it to \"auto\" (the flag decides)"),
    ({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 8},
     "x.json: train_micro_batch_size_per_gpu is 8 but --per_device_train_batch_size gives 2; set it to \"auto\" "
     "(the flag decides)"),
    ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}},
     "x.json: bf16.enabled is True but --bf16 is not given; set it to \"auto\" (the flag decides)"),
    ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}},
     "x.json: has a \"optimizer\" section; prefalign runs its own AdamW and schedule, set by --learning_rate, "
     "--adam_beta1/2, --weight_decay: remove it"),
    ({"zero_optimization": {"stage": 0}}, "x.json: zero_optimization.stage is 0; prefalign runs ZeRO stage 1, 2 or 3"),
])
def test_loop_config_refuses_what_disagrees_with_the_flags(cfg, message):
    with pytest.raises(PrefalignError) as e:
        loop_config(cfg, _args(), "x.json")
    assert str(e.value) == message


def test_read_config_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 3},\n  oops\n}')
    with pytest.raises(PrefalignError) as e:
        read_config(str(bad))
    assert str(e.value) == f"{bad}:3: not valid JSON (Expecting property name enclosed in double quotes)"
    with pytest.raises(PrefalignError) as e:
        read_config("zero4")
    assert str(e.value) == "--deepspeed zero4: no such file (and not one of zero2, zero3, zero3_offload)"
    bad.write_text("[1]")
    with pytest.raises(PrefalignError, match="must be a JSON object"):
        read_config(str(bad))
    assert read_config("zero3") == PRESETS["zero3"] and read_config("zero3") is not PRESETS["zero3"]


@pytest.fixture
def one_pair(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": conv(("user", "hi")), "chosen": conv(("assistant", "a")),
                                                   "rejected": conv(("assistant", "b"))}])


@pytest.mark.parametrize(("env", "flags", "message"), [
    # Accelerate's CPU mode would drop DeepSpeed without a word
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_USE_CPU": "true"}, [],
     "accelerate config: DeepSpeed cannot run in Accelerate's CPU mode (it would silently train without DeepSpeed); "
     "drop --cpu / use_cpu, prefalign picks gloo itself on a machine without GPU"),
    ({"ACCELERATE_USE_FSDP": "true"}, ["--deepspeed", "zero3"],
     "--deepspeed: both FSDP (accelerate config) and DeepSpeed (--deepspeed) asked for; pick one"),
    ({}, ["--deepspeed", "zero9"], "--deepspeed zero9: no such file (and not one of zero2, zero3, zero3_offload)"),
    ({}, ["--deepspeed", "zero2", "--max_grad_norm", "2"], None),  # passes the checks: refused by the JSON below
])
def test_cli_refuses_before_writing(monkeypatch, tiny_model_dir, one_pair, tmp_path, capsys, env, flags, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if message is None:  # a JSON file that disagrees with a flag
        ds = tmp_path / "ds.json"
        ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}))
        flags = ["--deepspeed", str(ds), "--max_grad_norm", "2"]
        message = (f"{ds}: gradient_clipping is 1.0 but --max_grad_norm gives 2.0; set it to \"auto\" "
                   "(the flag decides)")
    assert run_cli("dpo", tiny_model_dir, one_pair, tmp_path / "out", "--max_steps", 1, *flags) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"prefalign dpo: error: {message}"]
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_zero3_buckets_sized_from_the_models_inside_a_wrapper(tiny_model_dir):
    """PPO trains policy + value as one module without `config`: ZeRO-3's "auto" bucket sizes come from the largest
    hidden size inside (Accelerate's formulas), where Accelerate itself would refuse the module."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM

    from prefalign.train.zero import _hidden_size_buckets

    wrapper = torch.nn.ModuleDict({"policy": AutoModelForCausalLM.from_pretrained(tiny_model_dir)})
    zero = dict(PRESETS["zero3"]["zero_optimization"], stage3_param_persistence_threshold=7)
    _hidden_size_buckets(SimpleNamespace(deepspeed_config={"zero_optimization": zero}), wrapper)
    h = 32  # the tiny model's hidden size
    assert zero["reduce_bucket_size"] == h * h and zero["stage3_prefetch_bucket_size"] == int(0.9 * h * h)
    assert zero["stage3_param_persistence_threshold"] == 7  # a value the config gives is kept


def test_generation_weights_is_a_no_op_without_a_zero3_engine():
    import torch

    from prefalign.train.zero import generation_weights

    model = torch.nn.Linear(2, 2)
    with generation_weights(model):
        assert model(torch.ones(1, 2)).shape == (1, 2)
