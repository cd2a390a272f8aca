"""The demo's addition task: split disjointness, judge, systematic wrong answers, writers, accuracy."""

from __future__ import annotations

import json
import random

import pytest

from prefalign.demo import task
from prefalign.demo.task import TaskSpec


def _pair(prompt: str) -> frozenset[int]:
    return frozenset(task.operands(prompt))


def test_prompt_format_and_reference():
    assert task.operands("What is 37 + 48?") == (37, 48)
    assert task.reference_answer("What is 37 + 48?") == "37 + 48 = 85"
    assert task.reference_answer([{"role": "user", "content": "What is 99 + 99?"}]) == "99 + 99 = 198"
    with pytest.raises(ValueError, match="not a prompt"):
        task.operands("hello")


def test_splits_are_disjoint_as_unordered_pairs():
    # all held-out pairs vs many training draws: no unordered pair {a, b} is in both
    spec = TaskSpec()
    heldout = {_pair(p) for p in task.make_prompts(10_000, 0, "heldout", spec)}
    train = {_pair(p) for p in task.make_prompts(10_000, 1, "train", spec)}
    assert heldout and train
    assert not heldout & train
    # 90 x 90 ordered pairs; about 1 in 8 unordered pairs held out
    assert 0.08 < len(heldout) / (len(heldout) + len(train)) < 0.17


def test_make_prompts_is_seeded_and_distinct():
    a = task.make_prompts(50, 3, "heldout")
    assert a == task.make_prompts(50, 3, "heldout")
    assert a != task.make_prompts(50, 4, "heldout")
    assert len(set(a)) == 50  # sampled without replacement while the pool is large enough
    with pytest.raises(ValueError, match="split"):
        task.make_prompts(3, 0, "test")  # type: ignore[arg-type]


def test_judge():
    p = "What is 37 + 48?"
    assert task.judge(p, "37 + 48 = 85")
    assert task.judge(p, " 37 + 48 = 85\n")
    assert task.judge(p, "85")  # no '=': the last number counts
    assert not task.judge(p, "37 + 48 = 75")
    assert not task.judge(p, "37 + 48 = 851")
    assert not task.judge(p, "")
    assert not task.judge(p, "37 + 48 =")
    assert task.judge([{"role": "user", "content": p}], [{"role": "assistant", "content": "37 + 48 = 85"}])


def test_wrong_answers_are_systematic():
    rng = random.Random(0)
    # carry in the ones digit (7 + 8 = 15): the carry is dropped, 85 -> 75
    assert task.wrong_answer("What is 37 + 48?", rng) == "37 + 48 = 75"
    # no carry (2 + 1 = 3): the ones digit slips by 1 or 2, 73 -> 71, 72, 74 or 75
    seen = {task.wrong_answer("What is 32 + 41?", rng) for _ in range(100)}
    assert seen == {"32 + 41 = 71", "32 + 41 = 72", "32 + 41 = 74", "32 + 41 = 75"}
    # ones digit 9 / 0: the slip stays inside the tens (79 -> 77, 78 only; 70 -> 71, 72 only)
    assert {task.wrong_answer("What is 35 + 44?", rng) for _ in range(50)} == {"35 + 44 = 77", "35 + 44 = 78"}
    assert {task.wrong_answer("What is 30 + 40?", rng) for _ in range(50)} == {"30 + 40 = 71", "30 + 40 = 72"}
    for p in task.make_prompts(300, 0, "train"):
        assert not task.judge(p, task.wrong_answer(p, rng))


def test_sft_rows_wrong_fraction():
    rows = task.sft_rows(2000, 0, wrong_fraction=0.6)
    assert rows[0]["messages"][0]["role"] == "user" and rows[0]["messages"][1]["role"] == "assistant"
    wrong = sum(not task.judge(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows)
    # Binomial(2000, 0.6): sd = 22, so 0.6 +- 0.05 is > 4 sd
    assert abs(wrong / 2000 - 0.6) < 0.05
    assert all(task.judge(r["messages"][0]["content"], r["messages"][1]["content"])
               for r in task.sft_rows(200, 0, wrong_fraction=0.0))
    heldout = {_pair(p) for p in task.make_prompts(10_000, 0, "heldout")}
    assert not {_pair(r["messages"][0]["content"]) for r in rows} & heldout


def test_writers_produce_prefalign_formats(tmp_path):
    sft = task.write_sft(tmp_path / "sft.jsonl", 20, 0)
    dpo = task.write_dpo_pairs(tmp_path / "d" / "dpo.jsonl", 20, 0)
    pre = task.write_pretrain_corpus(tmp_path / "pre.jsonl", 20, 0)
    prm = task.write_prompts(tmp_path / "prompts.jsonl", task.make_prompts(5, 0, "heldout"))
    sft_rows = [json.loads(line) for line in sft.read_text().splitlines()]
    dpo_rows = [json.loads(line) for line in dpo.read_text().splitlines()]
    pre_rows = [json.loads(line) for line in pre.read_text().splitlines()]
    assert len(sft_rows) == len(dpo_rows) == len(pre_rows) == 20
    assert set(sft_rows[0]) == {"messages"}
    r = dpo_rows[0]
    assert set(r) == {"prompt", "chosen", "rejected"}
    assert r["prompt"][0]["role"] == "user" and r["chosen"][0]["role"] == "assistant"
    for r in dpo_rows:
        assert task.judge(r["prompt"], r["chosen"]) and not task.judge(r["prompt"], r["rejected"])
    text = pre_rows[0]["text"]
    assert text.startswith("What is ") and " = " in text
    assert json.loads(prm.read_text().splitlines()[0])["prompt"][0]["role"] == "user"


def test_accuracy_with_a_rule_generator():
    prompts = task.make_prompts(40, 0, "heldout")

    def half_right(batch: list[str]) -> list[str]:
        # right on even positions, carry-dropping / off-by-one wrong on odd ones: accuracy is exactly 0.5
        rng = random.Random(0)
        return [task.reference_answer(p) if i % 2 == 0 else task.wrong_answer(p, rng) for i, p in enumerate(batch)]

    assert task.accuracy(half_right, prompts) == 0.5
    assert task.accuracy(lambda b: [task.reference_answer(p) for p in b], prompts) == 1.0
    with pytest.raises(ValueError, match="completions"):
        task.accuracy(lambda b: b[:1], prompts)
