"""End to end through the CLI on tiny models: train-tokenizer → init-model → pretrain → sft → rm, the
conventions DPO has (metrics.jsonl, --config YAML, checkpoints + resume, one-line errors)."""

from __future__ import annotations

import json
import random

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from helpers import WORDS, corpus, write_jsonl
from prefalign.cli import main
from prefalign.train.metrics import read_metrics

FAST = ["--disable_tqdm", "--logging_steps", "1", "--save_steps", "0"]


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    """Conversations whose answers are a fixed function of the question: learnable by a tiny model."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"prompt": f"{a} + {b}", "prompt_id": "x", "messages": [
            {"role": "user", "content": f"{a} + {b}"}, {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]})
    return rows


def rm_rows(n: int, seed: int) -> list[dict]:
    """Clearly separable pairs: chosen answers are polite yeses, rejected ones curt noes."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(4))
        rows.append({"prompt": [{"role": "user", "content": q}],
                     "chosen": [{"role": "assistant", "content": "yes sure thank you " + rng.choice(WORDS)}],
                     "rejected": [{"role": "assistant", "content": "no " + rng.choice(WORDS) + " bad no"}]})
    return rows


def losses(out_dir) -> list[float]:
    return [m["loss"] for m in read_metrics(out_dir / "metrics.jsonl") if "loss" in m]


@pytest.mark.slow
def test_tokenizer_init_pretrain_chain(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(corpus(300)) + "\n")
    tok_dir, model_dir, pre_dir = tmp_path / "tok", tmp_path / "init", tmp_path / "pre"
    assert main(["train-tokenizer", "--dataset_name", str(text), "--vocab_size", "320", "--output_dir",
                 str(tok_dir)]) == 0
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert len(tok) == 320 and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        "<|im_start|>user\nhi<|im_end|>\n"
    assert main(["init-model", "--architecture", "llama", "--hidden_size", "32", "--num_hidden_layers", "2",
                 "--num_attention_heads", "4", "--num_key_value_heads", "2", "--intermediate_size", "64",
                 "--max_position_embeddings", "256", "--tokenizer", str(tok_dir), "--output_dir",
                 str(model_dir)]) == 0
    assert main(["pretrain", "--model_name_or_path", str(model_dir), "--dataset_name", str(text),
                 "--max_length", "64", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3",
                 "--max_steps", "20", "--output_dir", str(pre_dir), *FAST]) == 0
    curve = losses(pre_dir)
    assert len(curve) == 20
    # a random 320-token model starts near ln(320) = 5.77; 20 seeded steps of word soup reach about 4.9
    assert curve[0] > 5.0 and sum(curve[-5:]) / 5 < curve[0] - 0.6
    model = AutoModelForCausalLM.from_pretrained(pre_dir)
    assert model.config.model_type == "llama"
    assert "num_tokens" in read_metrics(pre_dir / "metrics.jsonl")[-1]


@pytest.mark.slow
def test_sft_lowers_loss_with_eval_and_resume(tmp_path):
    from helpers import build_model, build_tokenizer

    tok = build_tokenizer(tmp_path / "tok")
    build_model(tmp_path / "base", tok, "qwen2")
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows(48))
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model_name_or_path: {tmp_path / 'base'}\ndataset_name: {data}\nlearning_rate: 3.0e-3\n"
                   "per_device_train_batch_size: 8\neval_split_ratio: 0.125\nmax_steps: 16\n")
    out = tmp_path / "sft"
    assert main(["sft", "--config", str(cfg), "--output_dir", str(out), "--save_steps", "8", "--disable_tqdm",
                 "--logging_steps", "1", "--packing"]) == 0
    records = read_metrics(out / "metrics.jsonl")
    curve = [r["loss"] for r in records if "loss" in r]
    assert sum(curve[-3:]) / 3 < curve[0] - 1.0
    final = records[-1]
    assert {"eval_loss", "eval_mean_token_accuracy"} <= set(final)
    assert {"mean_token_accuracy", "num_tokens", "tokens/s"} <= set(records[-2])
    # resume from the step-12 checkpoint into a copy reproduces the uninterrupted losses of steps 9..16
    resumed = tmp_path / "resumed"
    import shutil

    shutil.copytree(out / "checkpoint-8", resumed / "checkpoint-8")
    assert main(["sft", "--config", str(cfg), "--output_dir", str(resumed), "--resume_from_checkpoint", "latest",
                 "--disable_tqdm", "--logging_steps", "1", "--packing", "--save_steps", "0"]) == 0
    again = [r["loss"] for r in read_metrics(resumed / "metrics.jsonl") if "loss" in r]
    assert again == pytest.approx(curve[8:], rel=1e-4)


@pytest.mark.slow
def test_reward_model_separates_held_out_pairs_and_reloads(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", rm_rows(64, seed=1))
    held = write_jsonl(tmp_path / "test.jsonl", rm_rows(32, seed=2))
    out = tmp_path / "rm"
    assert main(["rm", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(train),
                 "--eval_dataset_name", str(held), "--learning_rate", "2e-3", "--per_device_train_batch_size", "8",
                 "--max_steps", "24", "--center_rewards_coefficient", "0.01", "--output_dir", str(out), *FAST]) == 0
    final = read_metrics(out / "metrics.jsonl")[-1]
    assert final["eval_accuracy"] >= 0.9
    model = AutoModelForSequenceClassification.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    # the reloaded model ranks a held-out pair as training did
    row = json.loads(held.read_text().splitlines()[0])
    texts = [tok.apply_chat_template(row["prompt"] + row[k], tokenize=False) for k in ("chosen", "rejected")]
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    rewards = model(**enc).logits.squeeze(-1)
    assert rewards[0] > rewards[1]


def test_errors_are_one_line(tmp_path, capsys, tiny_model_dir):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    assert main(["sft", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(bad),
                 "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"prefalign sft: error: {bad}:1: the conversation has no assistant message, so no token would " \
                  "be trained"
    assert main(["init-model", "--tokenizer", str(tiny_model_dir), "--output_dir", str(tiny_model_dir)]) == 2
    assert "already holds a model" in capsys.readouterr().err
    assert main(["train-tokenizer", "--dataset_name", str(bad), "--vocab_size", "100", "--output_dir",
                 str(tmp_path / "t")]) == 2
    assert "--vocab_size: must be at least 259" in capsys.readouterr().err
