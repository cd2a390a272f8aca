"""`prefalign distill` end to end on tiny models: the step-1 loss by hand, the draw between on-policy, dataset and
teacher completions, exact resume, B x A invariance, and one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import build_model, build_tokenizer, conv, run_cli, write_jsonl
from prefalign.losses.distill import generalized_jsd
from prefalign.train.metrics import read_metrics

KEYS = {"loss", "on_policy", "completions/mean_length", "grad_norm", "learning_rate", "epoch", "samples/s",
        "num_tokens", "step"}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("teacher")
    build_model(d, tiny_tokenizer, hidden_size=64, seed=7)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = [{"messages": conv(("user", f"what is {a} plus {b}"), ("assistant", str(a + b)))}
            for a in range(3) for b in range(2)]
    rows += [{"prompt": "the sky is", "completion": " blue"}, {"prompt": "two plus two is", "completion": " four"}]
    return write_jsonl(tmp_path_factory.mktemp("distill") / "rows.jsonl", rows)


def _run(model_dir, teacher_dir, data, out, *extra) -> int:
    return run_cli("distill", model_dir, data, out, "--teacher_model_name_or_path", teacher_dir,
                   "--max_new_tokens", 4, "--learning_rate", 1e-2, *extra)


def test_dataset_step_loss_by_hand_and_batch_accumulation_invariance(tiny_model_dir, teacher_dir, data, tmp_path,
                                                                        tiny_tokenizer):
    """--lmbda 0: the dataset completions; step 1's loss is the token mean of the JSD of the full logits, and
    8 x 1 equals 4 x 2 (the loss is a mean over the step's completion tokens)."""
    args = ("--lmbda", 0, "--beta", 0.3, "--max_steps", 1, "--num_train_epochs", 1)
    assert _run(tiny_model_dir, teacher_dir, data, tmp_path / "a", *args, "--per_device_train_batch_size", 8) == 0
    assert _run(tiny_model_dir, teacher_dir, data, tmp_path / "b", *args, "--per_device_train_batch_size", 4,
                "--gradient_accumulation_steps", 2) == 0
    a, b = (read_metrics(tmp_path / n / "metrics.jsonl")[0] for n in "ab")
    assert set(a) >= KEYS and a["on_policy"] == 0.0
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)

    student, teacher = (AutoModelForCausalLM.from_pretrained(d) for d in (tiny_model_dir, teacher_dir))
    total, count = 0.0, 0
    for r in map(json.loads, data.read_text().splitlines()):
        if "messages" in r:
            prompt = tiny_tokenizer.apply_chat_template(r["messages"][:1], add_generation_prompt=True, tokenize=False)
            full = tiny_tokenizer.apply_chat_template(r["messages"], tokenize=False)
            p_ids, ids = tiny_tokenizer(prompt).input_ids, tiny_tokenizer(full).input_ids
        else:
            p_ids = tiny_tokenizer(r["prompt"]).input_ids
            ids = tiny_tokenizer(r["prompt"] + r["completion"]).input_ids + [tiny_tokenizer.eos_token_id]
        x = torch.tensor([ids])
        with torch.no_grad():
            s, t = student(x).logits[0, :-1], teacher(x).logits[0, :-1]
        d = generalized_jsd(s[len(p_ids) - 1:], t[len(p_ids) - 1:], beta=0.3)
        total, count = total + float(d.sum()), count + d.numel()
    assert a["loss"] == pytest.approx(total / count, rel=1e-4)


@pytest.mark.slow
def test_on_policy_teacher_samples_checkpoints_and_exact_resume(tiny_model_dir, teacher_dir, data, tmp_path):
    out = tmp_path / "run"
    args = ("--lmbda", 0.5, "--per_device_train_batch_size", 2, "--max_steps", 4, "--save_steps", 2,
            "--eval_split_ratio", 0.25, "--seq_kd")
    assert _run(tiny_model_dir, teacher_dir, data, out, *args) == 0
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if "on_policy" in r and "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert {r["on_policy"] for r in train} == {0.0, 1.0}  # the seeded draw gives both here
    assert all(0 < r["completions/mean_length"] <= 4 for r in train)  # sampled (student or teacher): <= max_new_tokens
    assert all(r["loss"] > 0 for r in train) and "eval_loss" in records[-1]
    AutoModelForCausalLM.from_pretrained(out)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copy(out / "metrics.jsonl", resumed / "metrics.jsonl")
    assert _run(tiny_model_dir, teacher_dir, data, resumed, *args, "--resume_from_checkpoint", "latest") == 0
    again = [r for r in read_metrics(resumed / "metrics.jsonl") if "on_policy" in r and "loss" in r]
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for x, y in zip(train[2:], again[2:]):
        assert (x["on_policy"], x["completions/mean_length"]) == (y["on_policy"], y["completions/mean_length"])
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def other_vocab_teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("other_vocab")
    build_model(d, build_tokenizer(d, vocab_size=300))
    return d


@pytest.mark.parametrize("extra, message", [
    (["--lmbda", 1.5], "--lmbda: must lie in [0, 1], got 1.5"),
    (["--beta", -0.1], "--beta: must lie in [0, 1], got -0.1"),
    (["--max_new_tokens", 0], "--max_new_tokens: must be at least 1"),
    ("other_vocab", "--teacher_model_name_or_path: the teacher's vocabulary has 300 tokens, the student's 400"),
    ("text_rows", "distillation needs a prompt to sample from"),
])
def test_bad_input_is_one_line(tiny_model_dir, teacher_dir, data, tmp_path, capsys, extra, message, request):
    teacher = teacher_dir
    if extra == "other_vocab":
        teacher, extra = request.getfixturevalue("other_vocab_teacher"), []
    if extra == "text_rows":
        data, extra = write_jsonl(tmp_path / "text.jsonl", [{"text": "hello world"}]), []
    assert _run(tiny_model_dir, teacher, data, tmp_path / "x", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_missing_teacher_is_one_line(tiny_model_dir, data, tmp_path, capsys):
    assert run_cli("distill", tiny_model_dir, data, tmp_path / "x") == 2
    err = capsys.readouterr().err.strip()
    assert "--teacher_model_name_or_path" in err and len(err.splitlines()) == 1, err
