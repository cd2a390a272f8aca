"""`prefalign grpo|rloo|ppo` end to end on the tiny model: TRL metric names, saved models, exact resume,
LoRA with the adapter-disabled reference, and one-line errors."""

from __future__ import annotations

import shutil

import pytest
from transformers import AutoModelForCausalLM

from helpers import conv, run_cli, write_jsonl
from prefalign.train.metrics import read_metrics

GRPO_KEYS = {"loss", "reward", "reward_std", "rewards/length/mean", "rewards/length/std", "frac_reward_zero_std",
             "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
             "completions/mean_length", "completions/min_length", "completions/max_length",
             "completions/clipped_ratio", "completions/mean_terminated_length", "grad_norm", "learning_rate",
             "epoch", "completions/s", "num_tokens", "step"}


@pytest.fixture()
def prompts(tmp_path):
    rows = [{"prompt": conv(("user", f"what is {a} + {b}")), "answer": str(a + b)} for a in range(1, 5) for b in (1, 2)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def _run(command, model_dir, data, out, *extra) -> int:
    return run_cli(command, model_dir, data, out, "--max_completion_length", 6, "--learning_rate", 1e-2, *extra)


@pytest.mark.slow
def test_grpo_metrics_model_checkpoints_and_exact_resume(tiny_model_dir, prompts, tmp_path):
    """Rollouts are seeded by (seed, epoch, rollout) and dropout is off, so resuming from checkpoint-2
    reproduces steps 3-4 of the uninterrupted run."""
    out = tmp_path / "run"
    args = ("--reward_funcs", "length:5", "--num_generations", 4, "--per_device_train_batch_size", 8,
            "--beta", 0.1, "--max_steps", 4, "--save_steps", 2, "--eval_split_ratio", 0.25)
    assert _run("grpo", tiny_model_dir, prompts, out, *args) == 0
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if "reward" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and set(train[0]) >= GRPO_KEYS
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # policy == reference before the first update
    assert "eval_reward" in records[-1] and "eval_completions/mean_length" in records[-1]
    AutoModelForCausalLM.from_pretrained(out)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(out / "metrics.jsonl", resumed / "metrics.jsonl")
    assert _run("grpo", tiny_model_dir, prompts, resumed, *args, "--resume_from_checkpoint", "latest") == 0
    again = [r for r in read_metrics(resumed / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(train[2:], again[2:]):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


@pytest.mark.slow
def test_grpo_lora_uses_the_base_as_reference(tiny_model_dir, prompts, tmp_path):
    out = tmp_path / "lora"
    assert _run("grpo", tiny_model_dir, prompts, out, "--reward_funcs", "exact_match:number", "length:3",
                "--reward_weights", 1.0, 0.5, "--num_generations", 4, "--per_device_train_batch_size", 8,
                "--use_peft", "--lora_r", 4, "--beta", 0.2, "--max_steps", 2, "--loss_type", "grpo") == 0
    first, second = read_metrics(out / "metrics.jsonl")
    assert first["kl"] == pytest.approx(0.0, abs=1e-7) and second["kl"] > 0  # adapter (B=0 at init) vs base
    assert "rewards/exact_match_number/mean" in first and "rewards/length/mean" in first
    assert (out / "adapter_config.json").is_file()


@pytest.mark.slow
def test_rloo_runs_with_lora_and_saves_the_adapter(tiny_model_dir, prompts, tmp_path):
    out = tmp_path / "rloo"
    assert _run("rloo", tiny_model_dir, prompts, out, "--reward_funcs", "length:4", "--per_device_train_batch_size",
                4, "--use_peft", "--lora_r", 4, "--max_steps", 2) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert {"reward", "reward_std", "kl", "entropy", "completions/mean_length"} <= set(records[-1])
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("command, extra, message", [
    ("grpo", ["--reward_funcs", "nonsense"], "prefalign grpo: error: nonsense: not a reward function spec"),
    ("grpo", ["--reward_funcs", "no_such_module_xyz:fn"], "cannot import module 'no_such_module_xyz'"),
    ("grpo", [], "--reward_funcs: give --reward_funcs and/or --reward_model_name_or_path"),
    ("grpo", ["--reward_funcs", "length:3", "--num_generations", "3"], "must be a multiple of num_generations = 3"),
    ("grpo", ["--reward_funcs", "length:3", "--loss_type", "ppo"], "--loss_type: must be one of"),
    ("rloo", ["--reward_funcs", "length:3", "--use_vllm"], "--use_vllm:"),
    ("ppo", ["--reward_funcs", "length:3", "--kl_estimator", "k9"], "--kl_estimator: must be one of k1, k2, k3"),
])
def test_bad_flags_are_one_line_errors(tiny_model_dir, prompts, tmp_path, capsys, command, extra, message):
    assert _run(command, tiny_model_dir, prompts, tmp_path / "x", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


REWARDS = '''
def never(prompts, completions, **kw):
    return [None for _ in completions]


def boom(prompts, completions, **kw):
    scores = []
    for c in completions:
        scores.append(len(c) / 0)  # the user's bug
    return scores


def half(prompts, completions, answer, **kw):
    return [None if int(a) % 2 else 1.0 for a in answer]
'''


@pytest.fixture()
def rewards_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS)
    return path


def test_a_rollout_no_reward_scores_is_a_one_line_error(tiny_model_dir, prompts, rewards_file, tmp_path, capsys):
    out = tmp_path / "none"
    assert _run("grpo", tiny_model_dir, prompts, out, "--reward_funcs", f"{rewards_file}:never", "length:3",
                "--reward_weights", 1, 0, "--num_generations", 4, "--per_device_train_batch_size", 4,
                "--max_steps", 2) == 0  # one function that scores is enough
    assert _run("grpo", tiny_model_dir, prompts, out, "--reward_funcs", f"{rewards_file}:never",
                "--num_generations", 4, "--per_device_train_batch_size", 4, "--max_steps", 2,
                "--overwrite_output_dir") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["prefalign grpo: error: rewards at step 1 (rollout 1 of epoch 1): no reward function scored any "
                   "of the 4 completions (never: 4 None); check that the functions apply to this data (e.g. its "
                   "'answer' column)"]


def test_a_raising_reward_function_keeps_its_traceback_then_one_line(tiny_model_dir, prompts, rewards_file, tmp_path,
                                                                     capsys):
    assert _run("grpo", tiny_model_dir, prompts, tmp_path / "boom", "--reward_funcs", f"{rewards_file}:boom",
                "--num_generations", 4, "--per_device_train_batch_size", 4, "--max_steps", 2) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):"
    assert any(f'File "{rewards_file}", line 9, in boom' in line for line in err)
    assert "scores.append(len(c) / 0)  # the user's bug" in "\n".join(err)
    assert not any("prefalign/rollout" in line for line in err)  # our frames are left out
    assert err[-2] == "ZeroDivisionError: division by zero"
    assert err[-1] == ("prefalign grpo: error: reward function boom at step 1 (rollout 1 of epoch 1): raised "
                       "ZeroDivisionError: division by zero")


def test_ppo_counts_unscored_completions(tiny_model_dir, prompts, rewards_file, tmp_path, caplog):
    """`half` scores the rows with an even answer only: 4 of the 8 prompts (answers 2..6, one completion each)."""
    import logging

    out = tmp_path / "ppo"
    with caplog.at_level(logging.WARNING, logger="prefalign.stages.ppo"):
        assert _run("ppo", tiny_model_dir, prompts, out, "--reward_funcs", f"{rewards_file}:half",
                    "--per_device_train_batch_size", 8, "--max_steps", 1, "--num_ppo_epochs", 1) == 0
    (record,) = read_metrics(out / "metrics.jsonl")
    answers = [a + b for a in range(1, 5) for b in (1, 2)]
    assert record["objective/unscored"] == sum(x % 2 for x in answers) == 4
    assert "ppo: 4 of 8 completions have no score (every reward function returned None)" in caplog.text
