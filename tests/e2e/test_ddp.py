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
