"""FSDP: 2 processes (torchrun, gloo on CPU) launched with the environment that `accelerate launch` derives from
the shipped configs/accelerate/fsdp*.yaml shard the model and log the same losses and gradient norms as 1 process
with the same global batch; checkpoints hold whole weights, so a sharded run resumes and its final model loads
like any other."""

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

from helpers import conv, write_jsonl
from prefalign.train.metrics import read_metrics

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]


def launch_env(config: str) -> dict[str, str]:
    """What `accelerate launch --config_file CONFIG` exports for FSDP, computed by Accelerate's own launcher code
    (its CPU mode would start a single process, so the processes are started with torchrun here)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ROOT / config), "--num_processes", "2", "x.py"])
    validated = _validate_launch_command(args)
    args = validated[0] if isinstance(validated, tuple) else validated
    env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k == "ACCELERATE_USE_FSDP" or k.startswith("FSDP_")}


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env={**base, **env}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _torchrun() -> list[str]:
    return [shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun", "--nproc_per_node", "2",
            "-m", "prefalign.cli"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    # 10 pairs, batch 2 per process: the last optimizer step of an epoch has 1 micro-batch for 2 processes
    return write_jsonl(tmp_path_factory.mktemp("fsdp") / "pairs.jsonl", [
        {"prompt": conv(("user", f"what is {i % 7} + {i % 5}")), "chosen": conv(("assistant", f"{i % 7 + i % 5}")),
         "rejected": conv(("assistant", f"{i % 7 + i % 5 + 1} no"))} for i in range(10)])


@pytest.mark.parametrize(("config", "extra", "weights"), [
    ("configs/accelerate/fsdp.yaml", [], "model.safetensors"),
    ("configs/accelerate/fsdp_shard_grad_op.yaml", [], "model.safetensors"),
    # LoRA: frozen base and trainable adapter in the same units; the reference is the base with the adapter off
    ("configs/accelerate/fsdp.yaml", ["--use_peft", "--lora_r", "4"], "adapter_model.safetensors"),
])
def test_sharded_dpo_matches_one_process(tiny_model_dir, pairs, tmp_path, config, extra, weights):
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    heldout = write_jsonl(tmp_path / "heldout.jsonl", rows[:3])  # 3 pairs in groups of 2: one process pads
    env = launch_env(config)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    common = ["dpo", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(pairs), "--max_steps", "4",
              "--logging_steps", "1", "--disable_tqdm", "--learning_rate", "1e-3", "--per_device_train_batch_size", "2",
              "--save_steps", "2", "--max_grad_norm", "0.5", "--eval_dataset_name", str(heldout),
              "--per_device_eval_batch_size", "2", *extra]
    two = _run([*_torchrun(), *common, "--output_dir", str(tmp_path / "two")], env)
    assert "dpo: 4 steps" in two.stdout
    _run([sys.executable, "-m", "prefalign.cli", *common, "--gradient_accumulation_steps", "2", "--output_dir",
          str(tmp_path / "one")], {})
    a, b = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in b if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):  # the epoch's last step has one micro-batch for 2 processes: the other one pads
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm", "eval_loss", "eval_rewards/margins"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)
    assert "eval_loss" in b[-1]
    # whole weights, not shards: the sharded run's final model equals the single-process one
    w1, w2 = load_file(tmp_path / "one" / weights), load_file(tmp_path / "two" / weights)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    assert (tmp_path / "two" / "checkpoint-2" / weights).is_file()


def test_sharded_resume_reproduces_the_curve(tiny_model_dir, pairs, tmp_path):
    env = launch_env("configs/accelerate/fsdp.yaml")
    common = [*_torchrun(), "dpo", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(pairs),
              "--logging_steps", "1", "--disable_tqdm", "--learning_rate", "1e-3", "--per_device_train_batch_size", "2",
              "--save_steps", "2"]
    _run([*common, "--max_steps", "4", "--output_dir", str(tmp_path / "full")], env)
    # restart from the step-2 checkpoint of a copy: the optimizer state must come back whole into the shards
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    _run([*common, "--max_steps", "4", "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint",
          "latest"], env)
    full = {r["step"]: r for r in read_metrics(tmp_path / "full" / "metrics.jsonl")}
    resumed = {r["step"]: r for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")}
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        for key in ("loss", "grad_norm", "logps/chosen"):
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-7), (step, key)


def _rows(command: str) -> list[dict]:
    if command == "pretrain":
        return [{"text": f"{a} plus {b} makes {a + b}"} for a in range(6) for b in range(2)]
    if command == "sft":
        return [{"messages": conv(("user", f"{a} + {b}"), ("assistant", f"{a + b}"))} for a in range(6) for b in (1, 2)]
    if command == "rm":
        return [{"prompt": conv(("user", f"what is {i}")), "chosen": conv(("assistant", f"{i} yes thanks")),
                 "rejected": conv(("assistant", "no"))} for i in range(12)]
    return [{"prompt": conv(("user", f"what is {a} + {b}")), "answer": str(a + b)} for a in range(1, 5) for b in (1, 2)]


RL = ["--max_completion_length", "6", "--reward_funcs", "length:5"]


@pytest.mark.parametrize(("command", "extra", "keys"), [
    ("pretrain", ["--max_length", "16"], ("loss", "grad_norm")),
    ("sft", ["--packing"], ("loss", "mean_token_accuracy", "grad_norm")),
    ("rm", [], ("loss", "accuracy", "margin", "grad_norm")),
    ("grpo", [*RL, "--num_generations", "4", "--beta", "0.1"], ("loss", "reward", "kl", "grad_norm")),
    ("rloo", [*RL, "--num_generations", "4"], ("loss", "reward", "grad_norm")),
    # PPO's policy, value head and sampling: its parts are sharded as separate roots (PolicyAndValue.fsdp_units)
    ("ppo", RL, ("loss/policy_avg", "loss/value_avg", "objective/scores", "policy/approxkl_avg", "grad_norm")),
])
def test_every_stage_sharded_matches_one_process(tiny_model_dir, tmp_path, command, extra, keys):
    """2 sharded processes with batch 4 equal 1 process with batch 4 x accumulation 2. In the RL stages each
    process samples its share of a rollout's groups, decoding in lockstep with the other (its forwards hold
    collectives), and trains on micro-batches of the gathered rollout."""
    data = write_jsonl(tmp_path / "data.jsonl", _rows(command))
    env = launch_env("configs/accelerate/fsdp.yaml")
    common = [command, "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data),
              "--learning_rate", "1e-2", "--max_steps", "2", "--logging_steps", "1", "--disable_tqdm",
              "--per_device_train_batch_size", "4", *extra]
    _run([*_torchrun(), *common, "--output_dir", str(tmp_path / "two")], env)
    _run([sys.executable, "-m", "prefalign.cli", *common, "--gradient_accumulation_steps", "2", "--output_dir",
          str(tmp_path / "one")], {})
    a, b = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        for key in keys:
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)
