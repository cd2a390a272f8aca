"""The demo's synthetic task: two-digit addition with a rule-based judge, generated from a seed, no download.

"What is 37 + 48?" -> "37 + 48 = 85". Why this task: a tiny model trained from scratch learns it in minutes when
digits are single tokens, and its characteristic mistake is easy to name. The wrong answers are *systematic*:

* when the ones digits carry (7 + 8 >= 10) the wrong answer forgets the carry: "37 + 48 = 75";
* otherwise the ones digit slips by one or two: "32 + 41 = 71", "72", "74" or "75".

SFT data mixes right and wrong answers (`wrong_fraction`). With a fraction above one half, the most likely answer
the SFT model learns for a carry prompt is the carry-less one, while for the other prompts the right answer stays
the most likely (the slip's mass is split between up to four answers). Greedy accuracy therefore lands near the share
of prompts without a carry (about 55%), and the right answer still has real probability on carry prompts: exactly
what preference optimisation (DPO on right-vs-wrong pairs, or GRPO/PPO with the judge as reward) can fix.

Held-out prompts are unordered pairs {a, b} that never occur in any training file, in either order.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prefalign.data.types import Message

Split = Literal["train", "heldout"]


@dataclass(frozen=True)
class TaskSpec:
    """Parameters of the addition task."""

    low: int = 10
    """Smallest first operand."""
    high: int = 99
    """Largest first operand."""
    b_low: int = 10
    """Smallest second operand."""
    b_high: int = 99
    """Largest second operand."""
    heldout_every: int = 8
    """One unordered operand pair in this many is held out (never written to a training file)."""
    wrong_fraction: float = 0.6
    """Fraction of SFT / pretraining answers that are wrong (systematically, see the module docstring)."""
    split_seed: int = 1234
    """Seed of the train/held-out split; fixed so that every file of a demo run agrees on it."""


DEFAULT_SPEC = TaskSpec()
_PROMPT = "What is {a} + {b}?"
_PROMPT_RE = re.compile(r"What is (\d+) \+ (\d+)\?")
_ANSWER_RE = re.compile(r"=\s*(-?\d+)")
_INT_RE = re.compile(r"-?\d+")


def _is_heldout(a: int, b: int, spec: TaskSpec) -> bool:
    """A stable hash of the unordered pair decides the split, so (a, b) and (b, a) always fall together."""
    lo, hi = min(a, b), max(a, b)
    return random.Random(spec.split_seed * 1_000_003 + lo * 1_009 + hi).random() < 1.0 / spec.heldout_every


def operands(prompt: str | Sequence[Message]) -> tuple[int, int]:
    """The two operands of a prompt (a string or a conversation whose last user turn is the question)."""
    if not isinstance(prompt, str):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        prompt = users[-1] if users else ""
    m = _PROMPT_RE.search(prompt)
    if m is None:
        raise ValueError(f"not a prompt of the addition task: {prompt!r}")
    return int(m.group(1)), int(m.group(2))


def make_prompts(n: int, seed: int, split: Split = "train", spec: TaskSpec = DEFAULT_SPEC) -> list[str]:
    """`n` prompts of one split, drawn with replacement-free sampling when the split is large enough."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    want_heldout = split == "heldout"
    pool = [
        (a, b)
        for a in range(spec.low, spec.high + 1)
        for b in range(spec.b_low, spec.b_high + 1)
        if _is_heldout(a, b, spec) == want_heldout
    ]
    rng = random.Random(seed)
    if n <= len(pool):
        chosen = rng.sample(pool, n)
    else:  # more prompts than distinct pairs: repeat the pool in fresh shuffles
        chosen = [rng.choice(pool) for _ in range(n)]
    return [_PROMPT.format(a=a, b=b) for a, b in chosen]


def _format(a: int, b: int, total: int) -> str:
    return f"{a} + {b} = {total}"


def reference_answer(prompt: str | Sequence[Message]) -> str:
    """The right answer, in the task's answer format."""
    a, b = operands(prompt)
    return _format(a, b, a + b)


def has_carry(a: int, b: int) -> bool:
    """Whether adding the ones digits carries into the tens."""
    return a % 10 + b % 10 >= 10


def wrong_answer(prompt: str | Sequence[Message], rng: random.Random) -> str:
    """A systematic wrong answer: the carry forgotten when there is one, else the ones digit off by one or two."""
    a, b = operands(prompt)
    if has_carry(a, b):
        total = a + b - 10  # the carry into the tens digit is dropped
    else:
        ones = (a + b) % 10
        # a slip of 1 or 2 that stays inside the tens digit; four ways to be wrong (two at the edges) keep each
        # one rarer than the right answer even when most answers are wrong, so greedy decoding stays right here
        delta = rng.choice([d for d in (-2, -1, 1, 2) if 0 <= ones + d <= 9])
        total = a + b + delta
    return _format(a, b, total)


def judge(prompt: str | Sequence[Message], completion: str | Sequence[Message]) -> bool:
    """True when the completion's result (the number after the first '=', else its last number) is a + b."""
    if not isinstance(completion, str):
        completion = completion[-1]["content"] if completion else ""
    a, b = operands(prompt)
    m = _ANSWER_RE.search(completion)
    if m is not None:
        return int(m.group(1)) == a + b
    numbers = _INT_RE.findall(completion)
    return bool(numbers) and int(numbers[-1]) == a + b


def accuracy(generate_fn: Callable[[list[str]], list[str]], prompts: Sequence[str]) -> float:
    """Fraction of `prompts` whose completion by `generate_fn` (a batch of prompts -> completions) the judge accepts."""
    if not prompts:
        raise ValueError("accuracy needs at least one prompt")
    completions = generate_fn(list(prompts))
    if len(completions) != len(prompts):
        raise ValueError(f"generate_fn returned {len(completions)} completions for {len(prompts)} prompts")
    return sum(judge(p, c) for p, c in zip(prompts, completions)) / len(prompts)


# ---------------------------------------------------------------------------------------------- writers


def _answer(prompt: str, rng: random.Random, wrong_fraction: float) -> str:
    return wrong_answer(prompt, rng) if rng.random() < wrong_fraction else reference_answer(prompt)


def write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    """Rows as JSON Lines, written under a temporary name and then moved into place (never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path


def pair_row(prompt: str, chosen: str, rejected: str) -> dict:
    """One conversational preference pair: a user question, two assistant answers."""
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def pair_rows(prompts: Sequence[str], rng: random.Random) -> list[dict]:
    """The right answer chosen and a systematic wrong one rejected, for each prompt."""
    return [pair_row(p, reference_answer(p), wrong_answer(p, rng)) for p in prompts]


def sft_rows(n: int, seed: int, spec: TaskSpec = DEFAULT_SPEC, wrong_fraction: float | None = None) -> list[dict]:
    """`n` training conversations `{"messages": [user, assistant]}`, a `wrong_fraction` of them answered wrongly."""
    frac = spec.wrong_fraction if wrong_fraction is None else wrong_fraction
    rng = random.Random(seed + 1)
    rows = []
    for p in make_prompts(n, seed, "train", spec):
        rows.append({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": _answer(p, rng, frac)}]})
    return rows


def dpo_rows(n: int, seed: int, spec: TaskSpec = DEFAULT_SPEC) -> list[dict]:
    """`n` preference pairs in conversational format: the right answer chosen, a systematic wrong one rejected."""
    return pair_rows(make_prompts(n, seed, "train", spec), random.Random(seed + 2))


def pretrain_texts(n: int, seed: int, spec: TaskSpec = DEFAULT_SPEC, wrong_fraction: float | None = None) -> list[str]:
    """`n` plain-text documents: a question and its (sometimes wrong) answer, as a web page would hold them."""
    frac = spec.wrong_fraction if wrong_fraction is None else wrong_fraction
    rng = random.Random(seed + 3)
    return [f"{p} {_answer(p, rng, frac)}" for p in make_prompts(n, seed, "train", spec)]


def write_sft(path: Path, n: int, seed: int, spec: TaskSpec = DEFAULT_SPEC, wrong_fraction: float | None = None) -> Path:
    """Write SFT conversations as JSON Lines (`{"messages": [...]}` per line)."""
    return write_jsonl(path, sft_rows(n, seed, spec, wrong_fraction))


def write_dpo_pairs(path: Path, n: int, seed: int, spec: TaskSpec = DEFAULT_SPEC) -> Path:
    """Write DPO pairs as JSON Lines in TRL's conversational format (`prompt`, `chosen`, `rejected` message lists)."""
    return write_jsonl(path, dpo_rows(n, seed, spec))


def write_pretrain_corpus(path: Path, n: int, seed: int, spec: TaskSpec = DEFAULT_SPEC) -> Path:
    """Write a pretraining corpus as JSON Lines (`{"text": ...}` per line) for train-tokenizer and pretrain."""
    return write_jsonl(path, [{"text": t} for t in pretrain_texts(n, seed, spec)])


def write_prompts(path: Path, prompts: Sequence[str]) -> Path:
    """Write prompts for GRPO/PPO rollouts as JSON Lines (`{"prompt": [user message]}` per line)."""
    return write_jsonl(path, [{"prompt": [{"role": "user", "content": p}]} for p in prompts])
