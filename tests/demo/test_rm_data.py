"""The demo's on-policy reward-model data: (right, wrong) pairs built from the SFT model's own samples."""

from __future__ import annotations

from prefalign.demo import toy as st


def _row(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def test_on_policy_pairs_from_judged_samples():
    """By hand, with the judge (the number after '=' or else the last number must be a + b):
    12 + 34 = 46: right samples "12 + 34 = 46" and "46" (distinct, in first-seen order), wrong "45" then "47"
    (duplicates and the empty sample dropped) -> (46-sentence, 45), ("46", 47), the right ones taken in turn;
    19 + 25 = 44: no right sample, so the reference answer is chosen against the one distinct wrong sample;
    10 + 10 = 20: only right samples -> no pair."""
    prompts = ["What is 12 + 34?", "What is 19 + 25?", "What is 10 + 10?"]
    samples = [["12 + 34 = 46", "12 + 34 = 45", "12 + 34 = 47", "12 + 34 = 45", "46", "", "12 + 34 = 46"],
               ["19 + 25 = 34", "19 + 25 = 34"],
               ["10 + 10 = 20"]]
    assert st.on_policy_pair_rows(prompts, samples) == [
        _row(prompts[0], "12 + 34 = 46", "12 + 34 = 45"),
        _row(prompts[0], "46", "12 + 34 = 47"),
        _row(prompts[1], "19 + 25 = 44", "19 + 25 = 34"),
    ]
    assert st.on_policy_pair_rows([], []) == []
