"""Supervised data: rows -> SFTExample -> token ids with a loss mask (raw text corpora are in `data.corpus`).

Row formats (detected per row, first match wins):
- conversational: a `messages` list of {role, content} (as HuggingFaceH4/ultrachat_200k, whose `prompt` and
  `prompt_id` columns are then ignored). Loss on the tokens of EVERY assistant turn, as MiniMind's SFT mask does.
- prompt/completion: `prompt` + `completion`, both strings or both message lists. Loss on the completion only
  (TRL's completion_only_loss), so an assistant turn inside a conversational prompt is context, not a target.
- plain text: a `text` column (--dataset_text_field). Loss on every token.
With --completion_only_loss false every token of every format is a target.

Assistant tokens are found by rendering prefixes, the rule DPO uses for completions: turn i's tokens are those
that template(messages[:i+1]) adds after template(messages[:i], add_generation_prompt=True); with ChatML that is
the answer, `<|im_end|>` and the newline. Where a template renders an earlier part differently once more
follows (so the prefix is not a token prefix of the whole), the span starts where the tokens diverge.

Raw text (prompt/completion strings, plain text) follows TRL 1.16's SFT rule, the one DPO uses for raw pairs
(`data.tokenize.encode_raw`): prompt and prompt + completion are tokenized with the tokenizer's default special
tokens (a BOS its post-processor adds starts the sequence), EOS is appended so that the model learns to stop, and
the trained part starts where the two token sequences diverge.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from prefalign.config import DataArgs
from prefalign.data.content import normalize_content, refuse_images
from prefalign.data.load import load_examples
from prefalign.data.templates import fill_prompt_template, render, require_chat_template
from prefalign.data.tokenize import common_prefix, encode_raw, encode_texts
from prefalign.data.types import ROLES, Message, SFTExample, TokenizedSample, with_system_prompt
from prefalign.data.types import kind as _kind
from prefalign.errors import PrefalignError

logger = logging.getLogger("prefalign.data")


@dataclass
class SFTTokenizeStats:
    total: int = 0
    kept: int = 0
    truncated: int = 0
    prefix_mismatch: int = 0
    dropped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        """One line, e.g. 'tokenized 12 samples: kept 11, truncated 3, dropped 1 (no trained token: 1)'."""
        text = f"tokenized {self.total} samples: kept {self.kept}, truncated {self.truncated}"
        if self.prefix_mismatch:
            text += f", prompt not a token prefix {self.prefix_mismatch}"
        dropped = sum(self.dropped.values())
        text += f", dropped {dropped}"
        if dropped:
            text += " (" + ", ".join(f"{r}: {n}" for r, n in sorted(self.dropped.items())) + ")"
        return text


# ---------------------------------------------------------------- rows -> SFTExample


def check_messages(value: Any, column: str, source: str) -> list[Message]:
    """A list of {role, content} with known roles and valid contents (strings or content parts, see data.content),
    or a PrefalignError naming the row."""
    if not isinstance(value, list) or not value:
        raise PrefalignError(f"column '{column}' must be a non-empty list of messages, got {_kind(value)}", source)
    out: list[Message] = []
    for i, msg in enumerate(value):
        where = f"'{column}' message {i}"
        if not isinstance(msg, dict):
            raise PrefalignError(f"{where} must be an object with role and content, got {_kind(msg)}", source)
        if msg.get("role") not in ROLES:
            raise PrefalignError(f"{where} has role {msg.get('role')!r} (allowed: {', '.join(ROLES)})", source)
        if msg.get("content") is None:
            raise PrefalignError(f"{where} has no 'content'", source)
        msg = {k: v for k, v in msg.items() if v is not None}  # Arrow fills missing keys with None
        msg["content"] = normalize_content(msg["content"], where, source)
        out.append(msg)
    return out


def normalize_sft_row(row: dict[str, Any], source: str, args: Any) -> SFTExample:
    """Detect the row's format (see the module docstring) and validate it."""
    if not isinstance(row, dict):
        raise PrefalignError(f"a row must be an object with columns, got {_kind(row)}", source)
    text_field = getattr(args, "dataset_text_field", "text")
    prompt_col = getattr(args, "prompt_column", "prompt")
    if row.get("messages") is not None:
        messages = _with_system(check_messages(row["messages"], "messages", source), args)
        if getattr(args, "completion_only_loss", True) and not any(m["role"] == "assistant" for m in messages):
            raise PrefalignError("the conversation has no assistant message, so no token would be trained", source)
        return SFTExample(source, messages=messages)
    if row.get("completion") is not None:
        prompt, completion = row.get(prompt_col), row["completion"]
        if isinstance(prompt, list) or isinstance(completion, list):
            context = check_messages(prompt, prompt_col, source)
            answer = check_messages(completion, "completion", source)
            messages = _with_system(context, args)
            return SFTExample(source, messages=messages + answer, train_from=len(messages))
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise PrefalignError(f"columns '{prompt_col}' and 'completion' must both be strings or both message "
                                 f"lists, got {_kind(prompt)} and {_kind(completion)}", source)
        if not completion:
            raise PrefalignError("column 'completion' is an empty string", source)
        if args.prompt_template is not None:
            prompt = fill_prompt_template(args.prompt_template, prompt, row, source)
        return SFTExample(source, prompt=prompt, text=completion)
    if row.get(text_field) is not None:
        text = row[text_field]
        if not isinstance(text, str) or not text:
            raise PrefalignError(f"column '{text_field}' must be a non-empty string, got {_kind(text)}", source)
        return SFTExample(source, text=text)
    present = ", ".join(sorted(row)) or "none"
    raise PrefalignError(f"no 'messages', '{prompt_col}'+'completion' or '{text_field}' column (columns present: "
                         f"{present})", source)


def _with_system(messages: list[Message], args: Any) -> list[Message]:
    return with_system_prompt(messages, getattr(args, "system_prompt", None))


def load_sft_examples(args: DataArgs) -> tuple[list[SFTExample], list[SFTExample] | None]:
    """(train, eval) examples; eval from --eval_dataset_name, else --eval_split_ratio, else None."""
    return load_examples(args, normalize_sft_row)


# ---------------------------------------------------------------- SFTExample -> token ids + loss mask


def _conversation_texts(ex: SFTExample, tokenizer: Any, completion_only: bool) -> list[str]:
    """[full, prefix_1, upto_1, prefix_2, upto_2, ...] for every trained assistant turn."""
    msgs = ex.messages or []
    refuse_images(msgs, ex.source, "supervised fine-tuning")
    texts = [render(tokenizer, msgs, False, ex.source)]
    if completion_only:
        for i, m in enumerate(msgs):
            if m["role"] == "assistant" and i >= ex.train_from:
                texts += [render(tokenizer, msgs[:i], True, ex.source), render(tokenizer, msgs[:i + 1], False, ex.source)]
    return texts


def _conversation_mask(ids: list[list[int]]) -> tuple[list[bool], bool]:
    """Loss mask over ids[0] (the full conversation) from (prefix, upto) id pairs; and whether a prefix broke."""
    full = ids[0]
    mask = [False] * len(full)
    mismatch = False
    for prefix, upto in zip(ids[1::2], ids[2::2]):
        start = common_prefix(prefix, full)
        end = common_prefix(upto, full)
        mismatch |= start < len(prefix) or end < len(upto)
        for t in range(start, end):
            mask[t] = True
    return mask, mismatch


def tokenize_sft(examples: list[SFTExample], tokenizer: Any, args: Any, what: str | None = None
                 ) -> tuple[list[TokenizedSample], SFTTokenizeStats]:
    """Token ids and loss masks, truncated to --max_length (the end is cut, as TRL does); samples with no
    trained token left are dropped and counted. `what` names the split in the error when every one is dropped."""
    completion_only = bool(getattr(args, "completion_only_loss", True))
    max_length = args.max_length
    if max_length is not None and max_length < 2:
        raise PrefalignError(f"must be at least 2, got {max_length}", "--max_length")
    chat = [ex for ex in examples if ex.is_conversational]
    if chat:
        require_chat_template(tokenizer, chat[0].source)
    texts: list[str] = []
    spans: list[tuple[int, int]] = []
    for ex in chat:
        piece = _conversation_texts(ex, tokenizer, completion_only)
        spans.append((len(texts), len(texts) + len(piece)))
        texts += piece
    encoded = encode_texts(tokenizer, texts)
    raw = [ex for ex in examples if not ex.is_conversational]
    raw_ids = iter(encode_raw(tokenizer, [ex.prompt for ex in raw], [ex.text for ex in raw]))
    chat_spans = iter(spans)
    stats = SFTTokenizeStats(total=len(examples))
    out: list[TokenizedSample] = []
    for ex in examples:
        if ex.is_conversational:
            a, b = next(chat_spans)
            ids = encoded[a]
            mask, mismatch = _conversation_mask(encoded[a:b]) if completion_only else ([True] * len(ids), False)
        else:
            prompt, ids = next(raw_ids)
            start = common_prefix(prompt, ids)  # the prompt's end may merge with the completion's start
            mismatch = start < len(prompt)
            mask = [not completion_only] * start + [True] * (len(ids) - start)
        stats.prefix_mismatch += mismatch
        if max_length is not None and len(ids) > max_length:
            ids, mask = ids[:max_length], mask[:max_length]
            stats.truncated += 1
        sample = TokenizedSample(ids, [False, *mask[1:]] if mask else mask, ex.source)
        if sample.num_loss_tokens == 0:
            stats.dropped["no trained token left (check --max_length)"] += 1
            continue
        out.append(sample)
    stats.kept = len(out)
    if stats.prefix_mismatch:
        logger.warning("the tokens of a prompt or an earlier turn are not a prefix of the whole sample's (%d samples: "
                       "the chat template renders them differently once more follows, or a raw prompt's end merges "
                       "with its completion's start); trained spans start where the tokens diverge",
                       stats.prefix_mismatch)
    if examples and not out:
        hint = "; raise --max_length" if what else ""
        raise PrefalignError(f"all {len(examples)} samples dropped: no trained token left{hint}", what or "--max_length")
    return out, stats
