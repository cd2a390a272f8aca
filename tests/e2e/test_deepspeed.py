"""DeepSpeed ZeRO-2 / ZeRO-3 with real DeepSpeed, 2 processes on CPU (gloo), one torchrun launch for every setting
(tests/e2e/deepspeed_runs.py): each layout logs the same losses and gradient norms as 1 process without DeepSpeed
with the same global batch (2 per device x 2 processes = 2 x accumulation 2), a run resumed from its step-2
checkpoint continues the uninterrupted curve, and the saved model loads with AutoModelForCausalLM."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import conv, run_cli, write_jsonl
from prefalign.train.metrics import read_metrics

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]
LORA = ["--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj"]
# (name, setting for deepspeed_runs.py, extra flags): ZeRO-2 and ZeRO-3 offload from the shipped accelerate configs,
# ZeRO-3 from the --deepspeed preset, ZeRO-3 + LoRA (reference: the adapter disabled) from a TRL-style JSON file with
# "auto" values
SETTINGS = [("z2", "accelerate:configs/accelerate/deepspeed_zero2.yaml", []), ("z3", "flag:zero3", []),
            ("z3_offload", "accelerate:configs/accelerate/deepspeed_zero3_offload.yaml", []),
            ("z3_lora", "flag:{json}", LORA)]
KEYS = ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logits/rejected", "learning_rate")


def _flags(data: Path, heldout: Path, model: Path) -> list[str]:
    return ["dpo", "--model_name_or_path", str(model), "--dataset_name", str(data), "--max_steps", "4",
            "--logging_steps", "1", "--disable_tqdm", "--learning_rate", "1e-3", "--per_device_train_batch_size", "2",
            "--save_steps", "2", "--max_grad_norm", "0.5", "--eval_dataset_name", str(heldout),
            "--per_device_eval_batch_size", "2"]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Every setting's full and resumed runs (one launch), and the 1-process runs without DeepSpeed (in-process)."""
    tmp = tmp_path_factory.mktemp("deepspeed")
    # 10 pairs, 4 per step: the third step has one micro-batch for 2 processes (one pads); 3 held-out pairs too
    rows = [{"prompt": conv(("user", f"what is {i % 7} + {i % 5}")), "chosen": conv(("assistant", f"{i % 7 + i % 5}")),
             "rejected": conv(("assistant", f"{i % 7 + i % 5 + 1} no"))} for i in range(10)]
    data, heldout = write_jsonl(tmp / "pairs.jsonl", rows), write_jsonl(tmp / "heldout.jsonl", rows[:3])
    ds_json = tmp / "ds_config.json"
    ds_json.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                   "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
                                   "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    flags = _flags(data, heldout, tiny_model_dir)
    plan = []
    for name, setting, extra in SETTINGS:
        kind, value = setting.format(json=ds_json).split(":", 1)
        use, config = (["--deepspeed", value], None) if kind == "flag" else ([], str(ROOT / value))
        full, resumed = tmp / name / "full", tmp / name / "resumed"  # resumed: from a copy of full's checkpoint-2
        plan += [{"argv": [*flags, *extra, *use, "--output_dir", str(full)], "accelerate": config},
                 {"argv": [*flags, *extra, *use, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"],
                  "accelerate": config, "seed": str(full / "checkpoint-2")}]
    (tmp / "plan.json").write_text(json.dumps(plan))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([torchrun, "--nproc_per_node", "2", str(ROOT / "tests/e2e/deepspeed_runs.py"),
                           str(tmp / "plan.json")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("dpo: 4 steps") == 2 * len(SETTINGS)  # one summary per run, from rank 0
    for one, extra in (("one", []), ("one_lora", LORA)):
        assert run_cli(*flags[:1], tiny_model_dir, data, tmp / one, *flags[5:], "--gradient_accumulation_steps",
                       "2", *extra) == 0
    return {"tmp": tmp, "stdout": done.stdout, "stderr": done.stderr}


def _metrics(path: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for row in read_metrics(path / "metrics.jsonl"):
        out.setdefault(row["step"], {}).update(row)
    return out


@pytest.mark.parametrize(("name", "reference"), [("z2", "one"), ("z3", "one"), ("z3_offload", "one"),
                                               ("z3_lora", "one_lora")])
def test_zero_matches_one_process(runs, name, reference):
    one, two = _metrics(runs["tmp"] / reference), _metrics(runs["tmp"] / name / "full")
    assert sorted(two) == [1, 2, 3, 4]
    for step in one:
        for key in (*KEYS, "eval_loss", "eval_rewards/margins"):
            if key in one[step]:
                assert two[step][key] == pytest.approx(one[step][key], rel=1e-5, abs=1e-6), (name, step, key)
    assert "eval_loss" in two[4]
    # 2 processes, each on its own share: the same numbers as 1 process with accumulation 2 need both shares
    state = json.loads((runs["tmp"] / name / "full" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2


def test_start_block_names_the_layout(runs):
    assert "deepspeed   ZeRO-2\n" in runs["stdout"] and "deepspeed   ZeRO-3\n" in runs["stdout"]
    assert "deepspeed   ZeRO-3, optimizer and parameters offloaded to CPU" in runs["stdout"]
    assert "= 2 per device x 1 accumulation x 2 processes" in runs["stdout"]
    assert "Setting accelerator to CPU" not in runs["stdout"] + runs["stderr"]  # DeepSpeed's import warning


@pytest.mark.parametrize("name", [s[0] for s in SETTINGS])
def test_resume_continues_the_curve(runs, name):
    full, resumed = _metrics(runs["tmp"] / name / "full"), _metrics(runs["tmp"] / name / "resumed")
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        for key in KEYS:
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-6, abs=1e-7), (name, step, key)


@pytest.mark.parametrize("name", ["z2", "z3", "z3_offload"])
def test_saved_model_loads_whole(runs, name):
    """ZeRO-3's partitioned weights are gathered: a normal HF directory, equal to the 1-process model."""
    out = runs["tmp"] / name / "full"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(runs["tmp"] / "one", dtype=torch.float32)
    ours, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5)
    assert load_file(out / "checkpoint-2" / "model.safetensors").keys() == load_file(out / "model.safetensors").keys()


def test_lora_adapter_saved_whole(runs):
    out, one = runs["tmp"] / "z3_lora" / "full", runs["tmp"] / "one_lora"
    ours, theirs = load_file(out / "adapter_model.safetensors"), load_file(one / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and ours
    for key in ours:
        assert ours[key].numel() > 0
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5)


def test_zero3_checkpoint_resumes_in_one_process_without_deepspeed(runs, tiny_model_dir):
    """A checkpoint holds whole weights and AdamW's state in torch's layout: 1 process without DeepSpeed continues
    a 2-process ZeRO-3 run's curve."""
    tmp = runs["tmp"]
    shutil.copytree(tmp / "z3" / "full" / "checkpoint-2", tmp / "z3_to_one" / "checkpoint-2")
    flags = _flags(tmp / "pairs.jsonl", tmp / "heldout.jsonl", tiny_model_dir)
    assert run_cli("dpo", tiny_model_dir, tmp / "pairs.jsonl", tmp / "z3_to_one", *flags[5:],
                   "--gradient_accumulation_steps", "2", "--resume_from_checkpoint", "latest") == 0
    full, resumed = _metrics(tmp / "one"), _metrics(tmp / "z3_to_one")
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        for key in KEYS:
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-6), (step, key)
