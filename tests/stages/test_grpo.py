"""GRPO: rollout layout and schedule, B x A invariance of every normalisation, and that it learns a reward."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import conv, run_cli, write_jsonl
from prefalign.rollout.sampling import CompletionGroups, take_rows
from prefalign.rollout.schedule import RolloutRows, plan_rollouts
from prefalign.train.metrics import read_metrics


def test_plan_is_a_seeded_shuffle_with_the_last_rollout_filled_cyclically():
    plan = plan_rollouts(5, 2, seed=3, epoch=0)
    flat = [i for r in plan for i in r]
    assert len(plan) == 3 and sorted(flat[:5]) == [0, 1, 2, 3, 4] and flat[5] == flat[0]
    assert plan == plan_rollouts(5, 2, seed=3, epoch=0)  # resume recomputes the same plan
    assert plan_rollouts(4, 8, seed=0, epoch=0)[0][4:] == plan_rollouts(4, 8, seed=0, epoch=0)[0][:4]


def test_completion_groups_lay_out_padded_and_shared_prompt_rows():
    """Two groups of G=2: prompt [5, 6] with completions [1, 2] and [3]; prompt [7] with [4] and [8, 9].
    Padded: one row per completion, prompt + completion, right-padded. Packed: each prompt once, the second
    completion of a group attends to its prompt (block prefix) and its positions restart after the prompt."""
    ids = torch.tensor([[1, 2], [3, 0], [4, 0], [8, 9]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 0], [1, 1]])
    groups = CompletionGroups([[5, 6], [7]], 2, ids, mask, pad_token_id=0)
    padded = groups.batch([1, 2], packed=False)
    assert padded["input_ids"].tolist() == [[5, 6, 3], [7, 4, 0]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert padded["completion_mask"].tolist() == [[0, 0, 1], [0, 1, 0]]
    assert padded["num_tokens"] == 3 + 2
    packed = groups.batch(range(4), packed=True)
    assert packed["input_ids"].tolist() == [[5, 6, 1, 2, 3, 7, 4, 8, 9]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1, 1, 2]]
    assert packed["attn_blocks"].tolist() == [[0, 4, 0, 0], [4, 5, 0, 2], [5, 7, 5, 5], [7, 9, 5, 6]]
    # the last prompt token predicts each group's first completion tokens
    assert packed["logit_index"].tolist() == [[1, 2], [1, 0], [5, 0], [5, 7]]
    assert packed["target_ids"].tolist() == [[1, 2], [3, 0], [4, 0], [8, 9]]
    assert packed["num_tokens"] == 4 + 3 + 2 + 3
    tensors = {"token_mask": mask, "advantages": torch.tensor([0.5, -0.5, 1.0, -1.0]), "loss_mask": mask}
    one = take_rows(tensors, [1])  # trimmed to row 1's one completion token
    assert one["loss_mask"].tolist() == [[1]] and one["advantages"].tolist() == [-0.5]


def test_rollout_rows_name_their_rollout_and_count_their_rows():
    ref = RolloutRows(epoch=1, rollout=2, rows=(4, 5, 6))
    assert len(ref) == 3 and list(ref.rows) == [4, 5, 6] and ref.rows[0] == 4


@pytest.fixture()
def prompts(tmp_path):
    rows = [{"prompt": conv(("user", f"what is {a} + {b}")), "answer": str(a + b)} for a in range(1, 5) for b in (1, 2)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def _grpo(model_dir, data, out, *extra) -> int:
    return run_cli("grpo", model_dir, data, out, "--num_generations", 4, "--max_completion_length", 6, *extra)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo"])
def test_batch_times_accumulation_gives_the_same_gradient(tiny_model_dir, prompts, tmp_path, loss_type):
    """B=8 x A=1 and B=2 x A=4 sample the same seeded rollout of 8 completions; the pre-clip gradient norm of
    step 1 must agree. A per-micro-batch normalisation would differ: e.g. bnpo as TRL does it averages 4
    micro-batch token means, which differs from the token mean whenever completion lengths differ."""
    norms = []
    for b, a in ((8, 1), (2, 4)):
        out = tmp_path / f"{loss_type}-{b}x{a}"
        assert _grpo(tiny_model_dir, prompts, out, "--loss_type", loss_type, "--per_device_train_batch_size", b,
                     "--gradient_accumulation_steps", a, "--max_steps", 1, "--max_grad_norm", 0, "--beta", 0.1,
                     "--reward_funcs", "length:6",
                     "--temperature", 0.9) == 0
        record = read_metrics(out / "metrics.jsonl")[0]
        norms.append((record["grad_norm"], record["loss"], record["reward"]))
    assert norms[0][2] == pytest.approx(norms[1][2], abs=1e-6)  # same rollout
    assert norms[0][0] == pytest.approx(norms[1][0], rel=1e-4)
    assert norms[0][1] == pytest.approx(norms[1][1], abs=1e-6)


@pytest.mark.slow
def test_grpo_raises_a_learnable_reward(tiny_model_dir, prompts, tmp_path):
    """length:1 rewards -|characters - 1|: the random tiny model emits multi-character tokens, and GRPO has to
    shift probability to short tokens. Measured: the mean reward of the first 5 steps is about -10, of the
    last 5 about -4.5; we ask for a gain of at least 2."""
    out = tmp_path / "learn"
    assert _grpo(tiny_model_dir, prompts, out, "--reward_funcs", "length:1", "--per_device_train_batch_size", 8,
                 "--max_steps", 20, "--learning_rate", 5e-2, "--lr_scheduler_type", "constant") == 0
    rewards = [r["reward"] for r in read_metrics(out / "metrics.jsonl")]
    assert len(rewards) == 20
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 2.0


@pytest.mark.slow
def test_num_iterations_reuses_the_rollout_with_old_log_probs(tiny_model_dir, prompts, tmp_path):
    """With num_iterations=2 steps 1-2 share a rollout (same reward); step 1 is on-policy (ratio 1: nothing
    clipped); after one update step 2's ratios move away from 1, and step 3 samples a new rollout."""
    out = tmp_path / "iters"
    assert _grpo(tiny_model_dir, prompts, out, "--reward_funcs", "length:3", "--per_device_train_batch_size", 8,
                 "--num_iterations", 2, "--max_steps", 3, "--learning_rate", 5e-2, "--epsilon", 0.01) == 0
    r1, r2, r3 = read_metrics(out / "metrics.jsonl")
    assert r1["reward"] == r2["reward"] and r3["reward"] != r2["reward"]
    assert r1["clip_ratio/region_mean"] == 0.0 and r2["clip_ratio/region_mean"] > 0.0
    assert json.loads((out / "prefalign_config.json").read_text())["num_iterations"] == 2
