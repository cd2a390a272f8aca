"""PPO: value alignment, a run with a reward model (and a value model from it), and a LoRA run with a value head."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from helpers import conv, run_cli, write_jsonl
from prefalign.stages.ppo import PolicyAndValue
from prefalign.train.metrics import read_metrics

PPO_KEYS = {"objective/kl", "objective/scores", "objective/rlhf_reward", "objective/non_score_reward",
            "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg",
            "completions/mean_length", "grad_norm", "learning_rate", "loss"}


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("rm")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_values_are_read_at_the_position_before_each_completion_token(tiny_model_dir, reward_model_dir):
    """Row [5, 6 | 7, 8]: completion tokens at positions 2 and 3, so values come from the score head at
    positions 1 and 2, exactly the per-position output of the classifier's head."""
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    value_model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir, num_labels=1)
    wrapper = PolicyAndValue(policy, value_model).eval()
    batch = {"layout": "padded", "input_ids": torch.tensor([[5, 6, 7, 8]]),
             "attention_mask": torch.ones(1, 4, dtype=torch.long), "completion_mask": torch.tensor([[0, 0, 1, 1]])}
    with torch.no_grad():
        logps, _, values = wrapper.evaluate(batch, temperature=1.0)
        hidden = value_model.base_model(input_ids=batch["input_ids"]).last_hidden_state
        expected = value_model.score(hidden)[0, 1:3, 0]
        full = torch.log_softmax(policy(input_ids=batch["input_ids"]).logits[0], -1)
    assert values[0].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert logps[0].tolist() == pytest.approx([full[1, 7].item(), full[2, 8].item()], abs=1e-5)
    shared = PolicyAndValue(policy).eval()  # a fresh head is zero: values 0 until trained
    with torch.no_grad():
        assert shared.evaluate(batch, 1.0)[2].abs().sum().item() == 0.0


@pytest.fixture()
def prompts(tmp_path):
    rows = [{"prompt": conv(("user", f"what is {a} + {b}"))} for a in range(1, 5) for b in (1, 2)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def _ppo(model_dir, data, out, *extra) -> int:
    return run_cli("ppo", model_dir, data, out, "--max_completion_length", 6, "--learning_rate", 1e-3, *extra)


@pytest.mark.slow
def test_ppo_with_a_reward_model_and_mini_batches(tiny_model_dir, reward_model_dir, prompts, tmp_path):
    """Rollout of 2 x 2 x 2 = 8 prompts, 2 PPO epochs x 2 mini-batches = 4 optimizer steps on it: step 1 is
    on-policy (approxkl 0, nothing clipped) and every step reports the same rollout score."""
    out = tmp_path / "ppo"
    assert _ppo(tiny_model_dir, prompts, out, "--reward_model_name_or_path", reward_model_dir,
                "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2, "--num_mini_batches", 2,
                "--num_ppo_epochs", 2, "--max_steps", 4, "--missing_eos_penalty", 1.0, "--save_steps", 2) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and set(records[0]) >= PPO_KEYS
    assert records[0]["policy/approxkl_avg"] == 0.0 and records[0]["policy/clipfrac_avg"] == 0.0
    assert len({r["objective/scores"] for r in records}) == 1
    assert records[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before any update
    assert (out / "checkpoint-2" / "value_model" / "config.json").is_file()
    AutoModelForCausalLM.from_pretrained(out)
    assert not (out / "value_model").exists()  # the final output is the policy alone
    # resuming loads the checkpoint's value model (every key checked) and finishes the run; checkpoint-2 lies inside
    # a rollout, which the resumed run samples again from the updated policy, so its numbers are not compared
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    assert _ppo(tiny_model_dir, prompts, resumed, "--reward_model_name_or_path", reward_model_dir,
                "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2, "--num_mini_batches", 2,
                "--num_ppo_epochs", 2, "--max_steps", 4, "--missing_eos_penalty", 1.0, "--save_steps", 2,
                "--resume_from_checkpoint", "latest") == 0
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")] == [3, 4]


@pytest.mark.slow
def test_ppo_lora_with_a_value_head_and_a_rule_reward(tiny_model_dir, prompts, tmp_path):
    out = tmp_path / "lora"
    assert _ppo(tiny_model_dir, prompts, out, "--reward_funcs", "length:4", "--use_peft", "--lora_r", 4,
                "--per_device_train_batch_size", 4, "--max_steps", 2, "--num_ppo_epochs", 2,
                "--kl_estimator", "k3", "--save_steps", 1) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert set(records[-1]) >= PPO_KEYS
    assert (out / "adapter_config.json").is_file() and (out / "checkpoint-1" / "value_head.safetensors").is_file()
    assert records[1]["loss/value_avg"] < records[0]["loss/value_avg"]  # the zero head starts to fit the returns
