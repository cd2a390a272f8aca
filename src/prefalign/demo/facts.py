"""The real-model demo's task: factual questions with known answers, and the rule that judges an answer.

The target behaviour is a one-sentence answer that contains the right fact ("What is the currency of Japan?" ->
"The currency of Japan is the yen."). SmolLM2-135M-Instruct knows most of these facts, but often answers at length,
adds invented detail, or drifts into another language when sampled; the judge says which answers are wanted:

* `has_fact`: the answer names the fact (any of its accepted spellings, as a whole word; chemical symbols are
  matched case-sensitively, everything else case-insensitively);
* `is_concise`: one sentence (no second sentence after a full stop, question or exclamation mark, no line break)
  of at most `MAX_WORDS` words, finished (the model ended it, not the token limit);
* `success`: both.

Questions are split into training and held-out ones by a fixed hash of the question, so the held-out questions
never reach a training file, whatever the seed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

MAX_WORDS = 20
HELDOUT_SHARE = 0.35  # about a third of the questions are held out
SPLIT_SEED = 4242


@dataclass(frozen=True)
class Fact:
    """One question, the spellings of its answer that count as right, and a one-sentence reference answer."""

    question: str
    answers: tuple[str, ...]
    reference: str
    case_sensitive: bool = False


def _facts(template: str, reference: str, table: dict[str, str | tuple[str, ...]], case_sensitive: bool = False
           ) -> list[Fact]:
    out = []
    for subject, answer in table.items():
        answers = (answer,) if isinstance(answer, str) else answer
        out.append(Fact(template.format(subject), answers, reference.format(subject, answers[0]), case_sensitive))
    return out


CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "Canada": "Ottawa", "Egypt": "Cairo", "Greece": "Athens",
    "Portugal": "Lisbon", "Norway": "Oslo", "Sweden": "Stockholm", "Kenya": "Nairobi", "Peru": "Lima",
    "Austria": "Vienna", "Ireland": "Dublin", "Poland": "Warsaw", "Hungary": "Budapest", "Thailand": "Bangkok",
    "Argentina": "Buenos Aires", "Mexico": ("Mexico City",), "India": ("New Delhi", "Delhi"), "Cuba": "Havana",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "South Korea": "Seoul", "Belgium": "Brussels",
}
SYMBOLS = {
    "gold": "Au", "silver": "Ag", "iron": "Fe", "sodium": "Na", "oxygen": "O", "helium": "He", "carbon": "C",
    "copper": "Cu", "potassium": "K", "lead": "Pb", "hydrogen": "H", "nitrogen": "N", "calcium": "Ca",
    "mercury": "Hg", "zinc": "Zn", "tin": "Sn", "chlorine": "Cl", "magnesium": "Mg", "sulfur": "S", "uranium": "U",
}
CURRENCIES = {
    "Japan": "yen", "the United Kingdom": ("pound", "sterling"), "the United States": "dollar", "India": "rupee",
    "Russia": "ruble", "China": ("yuan", "renminbi"), "Mexico": "peso", "Switzerland": "franc", "Brazil": "real",
    "South Korea": "won", "Germany": "euro", "Turkey": "lira", "South Africa": "rand", "Poland": "zloty",
    "Sweden": "krona",
}
LANGUAGES = {
    "Brazil": "Portuguese", "Egypt": "Arabic", "Greece": "Greek", "Japan": "Japanese", "Mexico": "Spanish",
    "Germany": "German", "Italy": "Italian", "Russia": "Russian", "Portugal": "Portuguese", "Argentina": "Spanish",
    "Turkey": "Turkish", "Poland": "Polish", "Iran": "Persian", "Israel": "Hebrew", "Thailand": "Thai",
}
AUTHORS = {
    "Hamlet": "Shakespeare", "Romeo and Juliet": "Shakespeare", "Pride and Prejudice": "Austen",
    "War and Peace": "Tolstoy", "Don Quixote": "Cervantes", "Oliver Twist": "Dickens", "1984": "Orwell",
    "The Odyssey": "Homer", "Moby-Dick": "Melville", "Frankenstein": "Shelley",
}
CONTINENTS = {
    "Kenya": "Africa", "Peru": "South America", "Japan": "Asia", "Norway": "Europe", "Canada": "North America",
    "Egypt": "Africa", "Argentina": "South America", "Thailand": "Asia", "Poland": "Europe", "Nigeria": "Africa",
}

FACTS: list[Fact] = [
    *_facts("What is the capital of {}?", "The capital of {} is {}.", CAPITALS),
    *_facts("What is the chemical symbol for {}?", "The chemical symbol for {} is {}.", SYMBOLS, case_sensitive=True),
    *_facts("What is the currency of {}?", "The currency of {} is the {}.", CURRENCIES),
    *_facts("What is the official language of {}?", "The official language of {} is {}.", LANGUAGES),
    *_facts("Who wrote {}?", "{} was written by {}.", AUTHORS),
    *_facts("On which continent is {}?", "{} is in {}.", CONTINENTS),
]
BY_QUESTION = {f.question: f for f in FACTS}

_SENTENCE_END = re.compile(r"[.!?](?=\s+\S)")  # a stop followed by more text starts a second sentence


def is_heldout(fact: Fact) -> bool:
    """A fixed hash of the question decides the split, the same for every seed."""
    return random.Random(f"{SPLIT_SEED}:{fact.question}").random() < HELDOUT_SHARE


def split(facts: Sequence[Fact] = FACTS) -> tuple[list[Fact], list[Fact]]:
    """(training facts, held-out facts)."""
    return [f for f in facts if not is_heldout(f)], [f for f in facts if is_heldout(f)]


def has_fact(fact: Fact, answer: str) -> bool:
    flags = 0 if fact.case_sensitive else re.IGNORECASE
    return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", answer, flags) for a in fact.answers)


def words(answer: str) -> int:
    return len(answer.split())


def is_concise(answer: str, finished: bool = True) -> bool:
    text = answer.strip()
    return (finished and 0 < words(text) <= MAX_WORDS and "\n" not in text
            and _SENTENCE_END.search(text) is None)


def success(fact: Fact, answer: str, finished: bool = True) -> bool:
    return has_fact(fact, answer) and is_concise(answer, finished)


def score(fact: Fact, answer: str, finished: bool = True) -> tuple[int, int]:
    """How good an answer is, for picking a pair's best and worst: successes first, then answers that hold the
    fact, then the rest; within a class, shorter is better."""
    named = has_fact(fact, answer)  # judged once: success is this and is_concise
    level = 2 if named and is_concise(answer, finished) else 1 if named else 0
    return level, -words(answer)
