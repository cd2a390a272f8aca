"""Preference-row formats: detect each row's shape, validate it, normalise it to one `Pair`.

Accepted shapes (auto-detected per row, so one file may mix them):

A. MiniMind: ``{"chosen": [conversation], "rejected": [conversation]}`` -- two whole conversations, no prompt.
B. TRL's recommended form: ``{"prompt": [messages], "chosen": [assistant message], "rejected": [...]}``.
C. hh-rlhf as TRL ships it: ``{"prompt": "first user turn", "chosen": [conversation], "rejected": [...]}``.
D. UltraFeedback binarized: like C plus ``prompt_id``, ``messages``, ``score_chosen``, ``score_rejected``.
E. Plain strings ``{"prompt": str, "chosen": str, "rejected": str}``: raw text, no chat template.
F. Any column names via ``--prompt_column/--chosen_column/--rejected_column``; ``--prompt_template`` wraps string
   prompts, e.g. "Question: {prompt}" + two newlines + "Answer: " for lvwerra/stack-exchange-paired; other
   ``{column}`` placeholders are filled from the row's columns of that name.

A message's content is a string or a list of content parts (text and image parts, see data.content).

When chosen and rejected are whole conversations (A, C, D) the prompt is their shared message prefix and a
string prompt column is ignored: it usually repeats the first user turn only, and trusting it would silently
drop multi-turn history. Only the final assistant turn is scored; everything before it is prompt.
"""

from __future__ import annotations

import math
from typing import Any

from prefalign.config import PairData
from prefalign.data.content import images_of, normalize_content, text_of
from prefalign.data.templates import fill_prompt_template
from prefalign.data.types import ROLES, Message, Pair, with_system_prompt
from prefalign.errors import PrefalignError

FORMAT_NAMES = {
    "A": "MiniMind (two whole conversations)",
    "B": "prompt messages + assistant answers (TRL)",
    "C": "string prompt + whole conversations (hh-rlhf)",
    "D": "UltraFeedback binarized",
    "E": "plain strings",
    "F": "plain strings via column mapping / --prompt_template",
}

_SCALARS = (str, int, float, bool)


def detect_format(row: dict[str, Any], args: PairData) -> str:
    """The letter (A-F, see the module docstring) of the shape `row` has; assumes the row is valid."""
    chosen = row.get(args.chosen_column)
    prompt = row.get(args.prompt_column)
    if isinstance(chosen, str):
        default_columns = (args.prompt_column, args.chosen_column, args.rejected_column) == (
            "prompt", "chosen", "rejected")
        return "E" if default_columns and not args.prompt_template else "F"
    whole = isinstance(chosen, list) and not _is_continuation([m for m in chosen if isinstance(m, dict)])
    if not whole:
        return "B"
    if "score_chosen" in row or "prompt_id" in row:
        return "D"
    return "C" if isinstance(prompt, str) else "A"


def normalize_pair(row: dict[str, Any], source: str, args: PairData) -> Pair:
    """Validate one raw row and turn it into a Pair; raise PrefalignError(reason, where=source) if it is bad."""
    if not isinstance(row, dict):
        raise PrefalignError(f"a row must be an object with columns, got {type(row).__name__}", where=source)
    chosen = _column(row, args.chosen_column, source, required=True)
    rejected = _column(row, args.rejected_column, source, required=True)
    prompt = _column(row, args.prompt_column, source, required=False)

    if isinstance(chosen, str) != isinstance(rejected, str):
        raise PrefalignError(
            f"column '{args.chosen_column}' is {_kind(chosen)} but '{args.rejected_column}' is {_kind(rejected)}; "
            "both must be strings or both lists of messages", where=source)
    if isinstance(chosen, str) and not isinstance(prompt, list):
        return _raw_pair(prompt, chosen, rejected, row=row, source=source, args=args)
    if isinstance(chosen, str):  # a message-list prompt with bare-string answers: answers are assistant turns
        chosen = [{"role": "assistant", "content": chosen}]
        rejected = [{"role": "assistant", "content": rejected}]
    for name, value in ((args.chosen_column, chosen), (args.rejected_column, rejected)):
        if not isinstance(value, list):
            raise PrefalignError(
                f"column '{name}' must be a string or a list of messages, got {_kind(value)}", where=source)
    return _chat_pair(prompt, chosen, rejected, row=row, source=source, args=args)


def _column(row: dict[str, Any], name: str, source: str, required: bool) -> Any:
    if name not in row:
        if not required:
            return None
        present = ", ".join(sorted(row)) or "none"
        raise PrefalignError(f"missing column '{name}' (columns present: {present})", where=source)
    value = row[name]
    if value is None and required:
        raise PrefalignError(f"column '{name}' is empty (null)", where=source)
    return value


def _kind(value: Any) -> str:
    return "null" if value is None else "a list" if isinstance(value, list) else f"a {type(value).__name__}"


def _raw_pair(prompt: Any, chosen: str, rejected: str, *, row: dict, source: str, args: PairData) -> Pair:
    """Formats E/F: three strings, tokenized later without a chat template."""
    if prompt is None:
        present = ", ".join(sorted(row))
        raise PrefalignError(
            f"missing column '{args.prompt_column}' (columns present: {present}); string answers need a "
            "string prompt (set --prompt_column)", where=source)
    if not isinstance(prompt, str):
        raise PrefalignError(f"column '{args.prompt_column}' must be a string, got {_kind(prompt)}", where=source)
    for name, value in ((args.chosen_column, chosen), (args.rejected_column, rejected)):
        if not value.strip():
            raise PrefalignError(f"column '{name}' is an empty string", where=source)
    if args.prompt_template is not None:
        prompt = fill_prompt_template(args.prompt_template, prompt, row, source)
    return Pair(prompt, chosen, rejected, source, *_margin_and_extra(row, args, source))


def _chat_pair(prompt: Any, chosen: list, rejected: list, *, row: dict, source: str, args: PairData) -> Pair:
    """Formats A-D: build both full conversations, check they differ only in the final assistant turn."""
    chosen = _messages(chosen, args.chosen_column, source)
    rejected = _messages(rejected, args.rejected_column, source)
    if isinstance(prompt, list):
        prompt = _messages(prompt, args.prompt_column, source)
    elif prompt is not None and not isinstance(prompt, str):
        raise PrefalignError(
            f"column '{args.prompt_column}' must be a string or a list of messages, got {_kind(prompt)}",
            where=source)
    # B: the answers continue the prompt (a string prompt is then one user turn). Otherwise (A, C, D) the
    # answers are whole conversations and the prompt column is not used.
    if prompt is not None and _is_continuation(chosen) and _is_continuation(rejected):
        head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        chosen, rejected = head + chosen, head + rejected
    for name, conv in ((args.chosen_column, chosen), (args.rejected_column, rejected)):
        if not conv:
            raise PrefalignError(f"column '{name}' is an empty list of messages", where=source)
        if conv[-1]["role"] != "assistant":
            raise PrefalignError(
                f"the final turn of '{name}' is from '{conv[-1]['role']}', not the assistant; only a final "
                "assistant turn can be scored", where=source)
        if images_of(conv[-1:]):
            raise PrefalignError(f"the final assistant turn of '{name}' holds an image; only text answers can be "
                                 "scored", where=source)
        if not text_of(conv[-1]["content"]).strip():
            raise PrefalignError(f"the final assistant turn of '{name}' is empty", where=source)
    history = chosen[:-1]
    if rejected[:-1] != history:
        raise PrefalignError(_divergence(chosen, rejected, args), where=source)
    history = with_system_prompt(history, args.system_prompt)
    return Pair(history, [chosen[-1]], [rejected[-1]], source, *_margin_and_extra(row, args, source))


def _is_continuation(messages: list[Message]) -> bool:
    """True when a message list holds only the answer (assistant/tool turns), not a conversation from the start."""
    return bool(messages) and all(m.get("role") in ("assistant", "tool") for m in messages)


def _messages(value: list, column: str, source: str) -> list[Message]:
    out: list[Message] = []
    for i, msg in enumerate(value):
        where = f"'{column}' message {i}"
        if not isinstance(msg, dict):
            raise PrefalignError(f"{where} must be an object with role and content, got {_kind(msg)}", where=source)
        for key in ("role", "content"):
            if msg.get(key) is None:
                raise PrefalignError(f"{where} has no '{key}'", where=source)
        if msg["role"] not in ROLES:
            raise PrefalignError(
                f"{where} has unknown role '{msg['role']}' (allowed: {', '.join(ROLES)})", where=source)
        # Arrow fills keys that other rows' messages have with None; drop them so equal messages compare equal.
        msg = {k: v for k, v in msg.items() if v is not None}
        msg["content"] = normalize_content(msg["content"], where, source)
        out.append(msg)
    return out


def _divergence(chosen: list[Message], rejected: list[Message], args: PairData) -> str:
    i = next((k for k, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    what = (f"message {i} ({chosen[i]['role']} vs {rejected[i]['role']})" if i < min(len(chosen), len(rejected))
            else f"length ({len(chosen)} vs {len(rejected)} messages)")
    return (f"'{args.chosen_column}' and '{args.rejected_column}' conversations differ at {what}; they may "
            "differ only in the final assistant turn")


def _margin_and_extra(row: dict[str, Any], args: PairData, source: str) -> tuple[float | None, dict[str, Any]]:
    margin = row.get("margin")
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise PrefalignError(f"column 'margin' must be a finite number, got {margin!r}", where=source)
        margin = float(margin)
    skip = {args.prompt_column, args.chosen_column, args.rejected_column, "margin"}
    extra = {k: v for k, v in row.items() if k not in skip and isinstance(v, _SCALARS)}
    return margin, extra
