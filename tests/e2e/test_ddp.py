"""Data parallelism: 2 processes (torchrun, gloo on CPU) with per-device batch 2 log the same losses as 1 process
with batch 2 x accumulation 2 — the same global batch of 4 pairs per optimizer step. 10 pairs make the third step
ragged (1 micro-batch for 2 processes), which used to leave one process out of the gradient all-reduce and crash."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import conv, write_jsonl
from prefalign.train.metrics import read_metrics

pytestmark = pytest.mark.slow


def test_two_processes_match_one_with_accumulation(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": conv(("user", f"what is {i % 7} + {i % 5}")), "chosen": conv(("assistant", f"{i % 7 + i % 5}")),
         "rejected": conv(("assistant", f"{i % 7 + i % 5 + 1} no"))} for i in range(10)])
    common = ["dpo", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--max_steps", "4",
              "--logging_steps", "1", "--disable_tqdm", "--learning_rate", "1e-3", "--per_device_train_batch_size", "2",
              "--save_steps", "2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src"), "OMP_NUM_THREADS": "1"}
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "prefalign.cli", *common, "--output_dir",
                          str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("dpo: 4 steps") == 1  # one summary, from rank 0
    one = subprocess.run([sys.executable, "-m", "prefalign.cli", *common, "--gradient_accumulation_steps", "2",
                          "--output_dir", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]  # written once, by the main process
    for ra, rb in zip(a, b):
        for key in ("loss", "rewards/margins", "logps/chosen", "logits/rejected", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)
    assert (tmp_path / "two" / "checkpoint-2" / "trainer_state.json").is_file()


def test_vlm_two_processes_match_one(tiny_vlm_dir, tmp_path):
    """A VLM with its vision tower trained, on pairs with and without images, batch 1: some micro-batches carry no
    image, so on a step one process has vision-tower gradients and the other none (the all-reduce must still agree)."""
    from helpers import vlm_rows

    rows = vlm_rows(tmp_path / "images") + [
        {"prompt": conv(("user", f"what is {i} + 1")), "chosen": conv(("assistant", f"{i + 1}")),
         "rejected": conv(("assistant", "no"))} for i in range(2)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    common = ["dpo", "--model_name_or_path", str(tiny_vlm_dir), "--dataset_name", str(data), "--max_steps", "3",
              "--logging_steps", "1", "--disable_tqdm", "--learning_rate", "1e-3", "--per_device_train_batch_size", "1",
              "--freeze_vision_tower", "false", "--save_steps", "0"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src"), "OMP_NUM_THREADS": "1"}
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "prefalign.cli", *common, "--output_dir",
                          str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run([sys.executable, "-m", "prefalign.cli", *common, "--gradient_accumulation_steps", "2",
                          "--output_dir", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)


REWARD_FILE = '''
import os


def reward(prompts, completions, **columns):
    """Shorter is better; also records how many completions this process scored."""
    with open(os.environ["SCORED_LOG"] + "." + os.environ.get("RANK", "0"), "a") as f:
        f.write(f"{len(completions)}\\n")
    return [-float(len(c[0]["content"])) for c in completions]
'''


def test_grpo_processes_sample_their_share_and_match_one(tiny_model_dir, tmp_path):
    """GRPO with 2 processes x batch 4 samples 8 completions (2 prompts x 4) per step like 1 process x batch 4 x
    accumulation 2, but each process samples and scores only its prompt's group (4 completions), old-policy and
    reference log-probs included (num_iterations 2, beta 0.1); the gathered rollout trains to the same metrics."""
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": conv(("user", f"what is {a} + {b}"))}
                                                    for a in range(1, 5) for b in (1, 2)])
    (tmp_path / "rewards.py").write_text(REWARD_FILE)
    common = ["grpo", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--max_steps", "3",
              "--logging_steps", "1", "--disable_tqdm", "--learning_rate", "1e-2", "--per_device_train_batch_size",
              "4", "--num_generations", "4", "--max_completion_length", "6", "--num_iterations", "2", "--beta", "0.1",
              "--reward_funcs", f"{tmp_path / 'rewards.py'}:reward", "--loss_type", "grpo", "--save_steps", "0"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src"), "OMP_NUM_THREADS": "1"}
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "prefalign.cli", *common, "--output_dir",
                          str(tmp_path / "two")], env={**env, "SCORED_LOG": str(tmp_path / "two.log")},
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run([sys.executable, "-m", "prefalign.cli", *common, "--gradient_accumulation_steps", "2",
                          "--output_dir", str(tmp_path / "one")], env={**env, "SCORED_LOG": str(tmp_path / "one.log")},
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    # 3 steps of num_iterations 2: 2 rollouts; each process scored 4 of each rollout's 8 completions
    for rank in (0, 1):
        assert (tmp_path / f"two.log.{rank}").read_text().split() == ["4", "4"]
    assert (tmp_path / "one.log.0").read_text().split() == ["8", "8"]
    a, b = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("loss", "reward", "reward_std", "kl", "entropy", "grad_norm", "clip_ratio/region_mean",
                    "clip_ratio/low_min", "clip_ratio/high_max", "completions/mean_length",
                    "completions/max_terminated_length", "frac_reward_zero_std"):
            if ra.get(key) is None:
                assert rb.get(key) is None, (ra["step"], key)
                continue
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)
    assert a[1]["clip_ratio/region_mean"] > 0  # the second step on a rollout is off-policy: clipping engaged
