"""The smollm2 recipe's judge: which answers name the fact, which are one finished sentence, how pairs rank."""

from __future__ import annotations

import pytest

from prefalign.demo import facts

JAPAN_CURRENCY = facts.BY_QUESTION["What is the currency of Japan?"]
GOLD = facts.BY_QUESTION["What is the chemical symbol for gold?"]
INDIA = facts.BY_QUESTION["What is the capital of India?"]


@pytest.mark.parametrize(("fact", "answer", "has"), [
    (JAPAN_CURRENCY, "The currency of Japan is the yen.", True),
    (JAPAN_CURRENCY, "The currency of Japan is the Japanese Yen (JPY).", True),  # any case
    (JAPAN_CURRENCY, "Japan uses the yenta.", False),  # a whole word only
    (GOLD, "The chemical symbol for gold is Au.", True),
    (GOLD, "The chemical symbol for gold is AU.", False),  # symbols are case-sensitive
    (GOLD, "Gold is a metal from Australia.", False),
    (INDIA, "The capital of India is New Delhi.", True),
    (INDIA, "India's capital is Delhi.", True),  # either spelling
])
def test_has_fact(fact, answer, has):
    assert facts.has_fact(fact, answer) is has


@pytest.mark.parametrize(("answer", "finished", "concise"), [
    ("The currency of Japan is the yen.", True, True),
    ("The currency of Japan is the yen.", False, False),  # cut by the token limit
    ("The currency of Japan is the yen. It is used across the country.", True, False),  # two sentences
    ("The currency of Japan is the yen.\nIt is old", True, False),  # a line break
    ("The U.S.A. uses the dollar", True, False),  # a stop followed by text counts as a second sentence
    (" ".join(["word"] * 20) + ".", True, True),
    (" ".join(["word"] * 21) + ".", True, False),  # over MAX_WORDS
    ("", True, False),
])
def test_is_concise(answer, finished, concise):
    assert facts.is_concise(answer, finished) is concise


def test_score_orders_success_then_fact_then_shorter():
    answers = ["The currency of Japan is the yen.",
               "The currency of Japan is the yen. It is very old and used by everyone.",
               "The currency of Japan is the dollar.",
               "Japan is an island."]
    ranked = sorted(answers, key=lambda a: facts.score(JAPAN_CURRENCY, a), reverse=True)
    assert ranked == [answers[0], answers[1], answers[3], answers[2]]  # the wrong ones: shorter first
    assert facts.success(JAPAN_CURRENCY, answers[0]) and not facts.success(JAPAN_CURRENCY, answers[1])


def test_split_is_fixed_and_disjoint():
    train, heldout = facts.split()
    assert len(train) + len(heldout) == len(facts.FACTS) == len(facts.BY_QUESTION)  # questions are unique
    assert not {f.question for f in train} & {f.question for f in heldout}
    assert 0.25 < len(heldout) / len(facts.FACTS) < 0.45
    assert facts.split() == (train, heldout)  # no seed, no randomness between calls


def test_every_reference_answer_is_a_success():
    for fact in facts.FACTS:
        assert facts.success(fact, fact.reference), fact.reference
