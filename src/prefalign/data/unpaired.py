"""Unpaired feedback for KTO: rows -> `UnpairedExample` -> `TokenizedUnpaired`.

Accepted rows (detected per row, so one file may mix them):

- TRL's unpaired form: ``{"prompt": ..., "completion": ..., "label": true|false}``, standard (three strings, no chat
  template) or conversational (`prompt` a list of messages, `completion` the assistant turn(s) after it; a string
  prompt is one user turn). A completion that is a whole conversation: its history is the prompt (a prompt column
  is then not used, as for pairs) and its final assistant turn the completion.
- Thumbs-up/down columns under other names: `--prompt_column`, `--completion_column`, `--label_column`. A label is
  a boolean, 1 / 0 / -1, or one of the words in `LABEL_WORDS` (up/down, thumbs_up/thumbs_down, good/bad, ...).
- Any preference pair `data.formats` reads (no label column): unpaired on the fly, chosen desirable and rejected
  undesirable, both with the pair's prompt.

Order: paired rows are unpaired as TRL does it, per block of 1000 rows all chosen answers then all rejected ones
(`unpaired_order`), so a sequential run sees TRL's batches. Interleaving each pair's two answers instead would make
the mismatched KL completion of an answer (its neighbour's, `stages.kto`) the other answer to the same prompt. The
stage shuffles the examples every epoch by default, which makes the block order irrelevant.

Tokenization follows `data.tokenize`: conversational rows render `template(prompt, add_generation_prompt=True)`
and `template(prompt + completion)` and the completion is what the second adds after the first (the split falls
where the tokens diverge when the first is not a prefix); raw text follows TRL 1.16's rule for it
(`data.tokenize.encode_raw`): prompt and prompt + completion with the tokenizer's default special tokens (its BOS),
EOS appended, the split where the two diverge. Truncation is the pairs' (`data.tokenize.cut`) with one completion.
"""

from __future__ import annotations

import logging
from typing import Any

from prefalign.data.formats import normalize_pair
from prefalign.data.load import load_examples
from prefalign.data.sft import check_messages
from prefalign.data.templates import render, require_chat_template
from prefalign.data.tokenize import (
    PREFIX_MISMATCH,
    TokenizeStats,
    Truncation,
    common_prefix,
    cut,
    encode_raw,
    encode_texts,
)
from prefalign.data.types import Message, TokenizedUnpaired, UnpairedExample, kind, with_system_prompt
from prefalign.errors import PrefalignError

logger = logging.getLogger("prefalign.data")

UNPAIR_BLOCK = 1000  # TRL unpairs in datasets' default map batches of 1000 rows
LABEL_WORDS = {
    True: ("true", "yes", "up", "thumbs_up", "thumbsup", "thumbs up", "good", "positive", "like", "accept",
           "accepted", "desirable", "1", "+1", "👍"),
    False: ("false", "no", "down", "thumbs_down", "thumbsdown", "thumbs down", "bad", "negative", "dislike", "reject",
            "rejected", "undesirable", "0", "-1", "👎"),
}
_WORD_LABEL = {word: label for label, words in LABEL_WORDS.items() for word in words}


# ---------------------------------------------------------------- rows -> examples


def parse_label(value: Any, column: str, source: str) -> bool:
    """A thumbs-up (True) or thumbs-down (False) from a boolean, 1 / 0 / -1, or a word of `LABEL_WORDS`."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value in (1, 0, -1):
        return value == 1
    if isinstance(value, str) and value.strip().lower() in _WORD_LABEL:
        return _WORD_LABEL[value.strip().lower()]
    shown = repr(value) if isinstance(value, (str, int, float)) else kind(value)
    raise PrefalignError(f"column '{column}' must be true/false, 1/0/-1 or a word like up/down, thumbs_up/thumbs_down, "
                         f"good/bad; got {shown}", source)


def normalize_feedback(row: dict[str, Any], source: str, args: Any) -> list[UnpairedExample]:
    """The examples of one raw row: one for an unpaired row, two for a preference pair; PrefalignError if bad."""
    if not isinstance(row, dict):
        raise PrefalignError(f"a row must be an object with columns, got {kind(row)}", source)
    # Arrow gives a mixed file's rows every column, None where a row has none: a None label is no label.
    if row.get(args.label_column) is not None:
        return [_unpaired_row(row, source, args)]
    if row.get(args.chosen_column) is not None or row.get(args.rejected_column) is not None:
        pair = normalize_pair(row, source, args)
        return [UnpairedExample(pair.prompt, pair.chosen, True, source),
                UnpairedExample(pair.prompt, pair.rejected, False, source)]
    if args.label_column in row:
        raise PrefalignError(f"column '{args.label_column}' is empty (null)", source)
    present = ", ".join(sorted(row)) or "none"
    raise PrefalignError(f"missing column '{args.label_column}' (columns present: {present}); unpaired rows need "
                         f"'{args.prompt_column}', '{args.completion_column}' and '{args.label_column}', preference "
                         f"pairs '{args.chosen_column}' and '{args.rejected_column}'", source)


def _unpaired_row(row: dict[str, Any], source: str, args: Any) -> UnpairedExample:
    label = parse_label(row[args.label_column], args.label_column, source)
    if row.get(args.completion_column) is None:
        present = ", ".join(sorted(row))
        raise PrefalignError(f"missing column '{args.completion_column}' (columns present: {present})", source)
    completion, prompt = row[args.completion_column], row.get(args.prompt_column)
    if isinstance(completion, str) and not isinstance(prompt, list):
        return UnpairedExample(_raw_prompt(prompt, source, args), _text(completion, args.completion_column, source),
                               label, source)
    if isinstance(completion, str):  # message prompt, bare answer: the answer is an assistant turn
        completion = [{"role": "assistant", "content": completion}]
    completion = check_messages(completion, args.completion_column, source)
    if completion[0]["role"] not in ("assistant", "tool"):
        # A whole conversation (as pairs' formats A/C): its history is the prompt, a string prompt column is not used.
        prompt, completion = completion[:-1], completion[-1:]
    elif prompt is None:
        raise PrefalignError(f"missing column '{args.prompt_column}' (a completion of assistant turns needs the "
                             "prompt they answer)", source)
    elif isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    else:
        prompt = check_messages(prompt, args.prompt_column, source)
    _check_answer(completion, args.completion_column, source)
    return UnpairedExample(with_system_prompt(prompt, args.system_prompt), completion, label, source)


def _raw_prompt(prompt: Any, source: str, args: Any) -> str:
    if not isinstance(prompt, str):
        what = "missing" if prompt is None else f"a {kind(prompt)}"
        raise PrefalignError(f"column '{args.prompt_column}' must be a string for a string completion, got {what}",
                             source)
    if args.prompt_template is not None:
        if "{prompt}" not in args.prompt_template:
            raise PrefalignError("must contain '{prompt}'", where="--prompt_template")
        prompt = args.prompt_template.replace("{prompt}", prompt)  # not str.format: templates hold other braces
    return prompt


def _text(value: str, column: str, source: str) -> str:
    if not value.strip():
        raise PrefalignError(f"column '{column}' is an empty string", source)
    return value


def _check_answer(completion: list[Message], column: str, source: str) -> None:
    if any(m["role"] not in ("assistant", "tool") for m in completion):
        raise PrefalignError(f"column '{column}' must hold only the assistant's turn(s) after the prompt", source)
    if completion[-1]["role"] != "assistant" or not completion[-1]["content"].strip():
        raise PrefalignError(f"the final turn of '{column}' must be a non-empty assistant message", source)


def unpaired_order(rows: list[list[UnpairedExample]]) -> list[UnpairedExample]:
    """Examples in TRL's order: per block of 1000 rows, each row's first example (an unpaired row, or a pair's
    chosen answer) in row order, then the pairs' rejected answers in row order."""
    out: list[UnpairedExample] = []
    for start in range(0, len(rows), UNPAIR_BLOCK):
        block = rows[start:start + UNPAIR_BLOCK]
        out += [r[0] for r in block] + [r[1] for r in block if len(r) > 1]
    return out


def load_feedback(args: Any) -> tuple[list[UnpairedExample], list[UnpairedExample] | None]:
    """(train, eval) examples of --dataset_name (and the evaluation data); a held-out pair keeps both answers."""
    train, eval_ = load_examples(args, normalize_feedback)
    return unpaired_order(train), (unpaired_order(eval_) if eval_ is not None else None)


# ---------------------------------------------------------------- examples -> token ids


def encode_unpaired(examples: list[UnpairedExample], tokenizer: Any) -> list[tuple[list[int], list[int], bool]]:
    """(prompt ids, completion ids, prefix mismatch) of every example before truncation."""
    chat = [e for e in examples if e.is_conversational]
    if chat:
        require_chat_template(tokenizer, chat[0].source)
    texts: list[str] = []
    for e in chat:
        texts += [render(tokenizer, e.prompt, True, e.source), render(tokenizer, e.prompt + e.completion, False,
                                                                      e.source)]
    chat_ids = iter(encode_texts(tokenizer, texts))
    raw = [e for e in examples if not e.is_conversational]
    raw_ids = iter(encode_raw(tokenizer, [e.prompt for e in raw], [e.completion for e in raw]))  # type: ignore[misc]
    out = []
    for e in examples:
        prompt, full = (next(chat_ids), next(chat_ids)) if e.is_conversational else next(raw_ids)
        k = len(prompt) if full[:len(prompt)] == prompt else common_prefix(prompt, full)
        out.append((full[:k], full[k:], k < len(prompt)))
    return out


def tokenize_unpaired(examples: list[UnpairedExample], tokenizer: Any, limits: Truncation
                      ) -> tuple[list[TokenizedUnpaired], TokenizeStats]:
    """Tokenize and truncate; examples left without a completion token are dropped and counted."""
    stats = TokenizeStats(total=len(examples), max_length=limits.max_length, unit="examples")
    out: list[TokenizedUnpaired] = []
    for e, (prompt, completion, mismatch) in zip(examples, encode_unpaired(examples, tokenizer)):
        stats.prefix_mismatch += mismatch
        kept_prompt, (kept,) = cut(prompt, [completion], limits)
        if not kept:
            stats.dropped["no_completion"] += 1
            continue
        stats.prompt_truncated += len(kept_prompt) < len(prompt)
        stats.completion_truncated += len(kept) < len(completion)
        out.append(TokenizedUnpaired(kept_prompt, kept, e.label, e.source))
    stats.kept = len(out)
    if stats.prefix_mismatch:
        logger.warning("%s (%d examples); the prompt/completion split falls where the tokens diverge", PREFIX_MISMATCH,
                       stats.prefix_mismatch)
    if examples and not out:
        raise PrefalignError(f"all {len(examples)} examples dropped: {stats.reason_text('no_completion')}",
                             "--max_length")
    return out, stats


def load_tokenized_feedback(args: Any, tokenizer: Any, limits: Truncation
                            ) -> tuple[list[TokenizedUnpaired], list[TokenizedUnpaired] | None, dict[str, TokenizeStats]]:
    """(train, eval) token ids of the unpaired data in `args`, and what tokenization did to each split."""
    train_rows, eval_rows = load_feedback(args)
    train, stats = tokenize_unpaired(train_rows, tokenizer, limits)
    if not eval_rows:
        return train, None, {"train": stats}
    eval_, eval_stats = tokenize_unpaired(eval_rows, tokenizer, limits)
    return train, eval_, {"train": stats, "eval": eval_stats}


# ---------------------------------------------------------------- balance (TRL's guidance)


def label_summary(examples: list[Any]) -> str:
    desirable = sum(bool(e.label) for e in examples)
    return f"{desirable} desirable, {len(examples) - desirable} undesirable"


def balance_advice(n_desirable: int, n_undesirable: int, desirable_weight: float = 1.0,
                   undesirable_weight: float = 1.0) -> str | None:
    """TRL's warning when desirable and undesirable counts differ and neither weight lies in the range that makes
    (desirable_weight · n_D) : (undesirable_weight · n_U) between 1:1 and 4:3 (KTO paper, Eq. 8); None when fine."""
    n_d = max(n_desirable, 1)
    n_u = max(n_desirable + n_undesirable - n_d, 1)  # as TRL: from the clamped desirable count
    if n_d == n_u:
        return None
    d_low, d_high = round(n_u * undesirable_weight / n_d, 2), round(1.33 * n_u * undesirable_weight / n_d, 2)
    u_low, u_high = round(n_d * desirable_weight / n_u / 1.33, 2), round(n_d * desirable_weight / n_u, 2)
    if d_low <= desirable_weight <= d_high or u_low <= undesirable_weight <= u_high:
        return None
    return (f"{n_desirable} desirable and {n_undesirable} undesirable examples with desirable_weight="
            f"{desirable_weight:g} and undesirable_weight={undesirable_weight:g}: KTO wants (desirable_weight x "
            f"desirable) : (undesirable_weight x undesirable) between 1:1 and 4:3; set EITHER --desirable_weight in "
            f"[{d_low:g}, {d_high:g}] OR --undesirable_weight in [{u_low:g}, {u_high:g}] (not both)")
