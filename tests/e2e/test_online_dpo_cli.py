"""`prefalign online-dpo` end to end on the tiny model: TRL's OnlineDPO metric names, step 1 by hand, B x A
invariance, exact resume, LoRA with the adapter-disabled reference, and one-line errors."""

from __future__ import annotations

import math
import shutil

import pytest
from transformers import AutoModelForCausalLM

from helpers import conv, run_cli, write_jsonl
from prefalign.train.metrics import read_metrics

TRL_KEYS = {"objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
            "objective/scores", "objective/scores_margin", "rewards/chosen", "rewards/rejected", "rewards/margins",
            "rewards/accuracies", "logps/chosen", "logps/rejected", "val/contain_eos_token", "beta", "loss",
            "grad_norm", "learning_rate", "epoch", "num_tokens"}


@pytest.fixture()
def prompts(tmp_path):
    rows = [{"prompt": conv(("user", f"what is {a} + {b}")), "answer": str(a + b)} for a in range(1, 5) for b in (1, 2)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def _run(model_dir, data, out, *extra) -> int:
    return run_cli("online-dpo", model_dir, data, out, "--reward_funcs", "length:5", "--max_completion_length", 6,
                   "--learning_rate", 1e-2, *extra)


def test_metrics_step_one_by_hand_and_batch_accumulation_invariance(tiny_model_dir, prompts, tmp_path):
    """Before the first update policy == reference, so every pair's margin is 0: loss = log 2, kl = 0, rewards 0,
    accuracy 0 (strict); 4 prompts x 1 equals 2 x 2 accumulation (same rollout, loss a mean over pairs)."""
    common = ("--max_steps", 2, "--missing_eos_penalty", 1.0)
    assert _run(tiny_model_dir, prompts, tmp_path / "a", *common, "--per_device_train_batch_size", 4) == 0
    assert _run(tiny_model_dir, prompts, tmp_path / "b", *common, "--per_device_train_batch_size", 2,
                "--gradient_accumulation_steps", 2) == 0
    a, b = (read_metrics(tmp_path / n / "metrics.jsonl") for n in "ab")
    first = a[0]
    assert set(first) >= TRL_KEYS and first["beta"] == 0.1
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-6) and first["rewards/margins"] == pytest.approx(0.0, abs=1e-7)
    assert first["rewards/accuracies"] == 0.0 and first["objective/scores_margin"] >= 0
    assert first["objective/rlhf_reward"] == pytest.approx(first["objective/scores"], abs=1e-5)  # kl = 0
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm", "objective/scores", "rewards/margins", "objective/kl"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key
    assert a[1]["objective/kl"] != 0.0  # the policy moved
    AutoModelForCausalLM.from_pretrained(tmp_path / "a")


def test_shared_prompt_run_equals_padded_rows(tiny_model_dir, prompts, tmp_path, capsys):
    """--share_prompt (the default) scores each pair with its prompt once and trains as padded rows do: same losses
    and gradient norms over 3 steps with 3 samples per prompt (float32, rel 1e-4 after the policy has moved)."""
    common = ("--max_steps", 3, "--num_generations", 3, "--per_device_train_batch_size", 2)
    assert _run(tiny_model_dir, prompts, tmp_path / "shared", *common) == 0
    assert "packed: each group's prompt once" in capsys.readouterr().out
    assert _run(tiny_model_dir, prompts, tmp_path / "padded", *common, "--share_prompt", "false") == 0
    assert "padded prompt + completion rows" in capsys.readouterr().out
    shared, padded = (read_metrics(tmp_path / n / "metrics.jsonl") for n in ("shared", "padded"))
    assert len(shared) == len(padded) == 3
    for x, y in zip(shared, padded):
        for key in ("loss", "grad_norm", "objective/scores", "rewards/margins", "objective/kl", "num_tokens"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_checkpoints_and_exact_resume_and_eval(tiny_model_dir, prompts, tmp_path):
    out = tmp_path / "run"
    args = ("--num_generations", 3, "--per_device_train_batch_size", 2, "--max_steps", 4, "--save_steps", 2,
            "--eval_split_ratio", 0.25, "--loss_type", "ipo")
    assert _run(tiny_model_dir, prompts, out, *args) == 0
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert train[0]["loss"] == pytest.approx((0 - 1 / (2 * 0.1)) ** 2, rel=1e-5)  # ipo at margin 0: (1/(2 beta))^2
    assert "eval_objective/scores" in records[-1]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(out / "metrics.jsonl", resumed / "metrics.jsonl")
    assert _run(tiny_model_dir, prompts, resumed, *args, "--resume_from_checkpoint", "latest") == 0
    again = [r for r in read_metrics(resumed / "metrics.jsonl") if "loss" in r]
    for x, y in zip(train[2:], again[2:]):
        assert x["objective/scores"] == pytest.approx(y["objective/scores"], abs=1e-6)
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)


@pytest.mark.slow
def test_lora_uses_the_base_as_reference(tiny_model_dir, prompts, tmp_path, capsys):
    out = tmp_path / "lora"
    assert _run(tiny_model_dir, prompts, out, "--use_peft", "--max_steps", 1, "--per_device_train_batch_size", 2) == 0
    assert "the base model with the LoRA adapter disabled" in capsys.readouterr().out
    first = read_metrics(out / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (out / "adapter_config.json").exists()


@pytest.mark.parametrize("extra, message", [
    (["--num_generations", 1], "--num_generations: must be at least 2"),
    (["--loss_type", "nope"], "--loss_type: unknown loss 'nope'"),
    (["--beta", 0], "--beta: beta must be positive"),
])
def test_bad_flags_are_one_line_errors(tiny_model_dir, prompts, tmp_path, capsys, extra, message):
    assert _run(tiny_model_dir, prompts, tmp_path / "x", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_no_rewards_is_one_line(tiny_model_dir, prompts, tmp_path, capsys):
    assert run_cli("online-dpo", tiny_model_dir, prompts, tmp_path / "x") == 2
    err = capsys.readouterr().err.strip()
    assert "--reward_funcs" in err and len(err.splitlines()) == 1, err
