"""Prompt-only data for on-policy RL (GRPO, RLOO, PPO): rows -> PromptExample -> prompt token ids.

A row needs a prompt column (`--prompt_column`, default `prompt`): a non-empty string, or a non-empty list of
{role, content} messages that does not end with an assistant turn (the model writes that one). Every other
column (e.g. `answer`) is kept and handed to the reward functions as a keyword list, as TRL does.

Conversational prompts are rendered with the chat template and the generation prompt (ChatML:
`<|im_start|>assistant\\n`) and encoded without special tokens, since a template writes its own BOS; string
prompts get `--prompt_template` (`--system_prompt` does not apply to them) and are encoded with the tokenizer's
default special tokens, as TRL's GRPO encodes them and as the SFT and DPO stages encode raw text (a BOS-adding
tokenizer starts them with BOS). Prompts longer than `--max_prompt_length` are cut per `--truncation_mode`
(keep_end keeps the end, where the question is).
"""

from __future__ import annotations

import logging
from typing import Any

from prefalign.config import DataArgs
from prefalign.data.content import refuse_images
from prefalign.data.load import load_examples
from prefalign.data.sft import check_messages
from prefalign.data.templates import fill_prompt_template, render, require_chat_template
from prefalign.data.tokenize import encode_texts
from prefalign.data.types import PromptExample, with_system_prompt
from prefalign.data.types import kind as _kind
from prefalign.errors import PrefalignError

logger = logging.getLogger("prefalign.data")


def normalize_prompt_row(row: dict[str, Any], source: str, args: DataArgs) -> PromptExample:
    """Validate one row (see the module docstring); errors name `source` ("file:line")."""
    if not isinstance(row, dict):
        raise PrefalignError(f"a row must be an object with columns, got {_kind(row)}", source)
    column = args.prompt_column
    if column not in row or row[column] is None:
        present = ", ".join(sorted(k for k, v in row.items() if v is not None)) or "none"  # Arrow fills gaps with None
        raise PrefalignError(f"no '{column}' column (columns present: {present})", source)
    value = row[column]
    columns = {k: v for k, v in row.items() if k != column}
    if isinstance(value, str):
        if not value.strip():
            raise PrefalignError(f"column '{column}' is an empty string", source)
        if args.prompt_template is not None:
            value = fill_prompt_template(args.prompt_template, value, row, source)
        return PromptExample(value, source, columns)
    if isinstance(value, list):
        messages = check_messages(value, column, source)
        if messages[-1]["role"] == "assistant":
            raise PrefalignError(f"column '{column}' ends with an assistant message; the model writes that turn",
                                 source)
        return PromptExample(with_system_prompt(messages, args.system_prompt), source, columns)
    raise PrefalignError(f"column '{column}' must be a string or a list of messages, got {_kind(value)}", source)


def load_prompts(args: DataArgs) -> tuple[list[PromptExample], list[PromptExample] | None]:
    """(train, eval) prompts: eval from --eval_dataset_name, else --eval_split_ratio of train, else None."""
    return load_examples(args, normalize_prompt_row)


def prompt_text(example: PromptExample, tokenizer: Any) -> str:
    """The text the model continues: the chat template with its generation prompt, or the string itself."""
    if isinstance(example.prompt, str):
        return example.prompt
    require_chat_template(tokenizer, example.source)
    refuse_images(example.prompt, example.source, "on-policy training (GRPO, RLOO, PPO)")
    return render(tokenizer, example.prompt, add_generation_prompt=True, source=example.source)


def tokenize_prompts(
    examples: list[PromptExample], tokenizer: Any, max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
) -> tuple[list[list[int]], int]:
    """Token ids of every prompt (cut to `max_prompt_length`) and how many were cut."""
    if truncation_mode not in ("keep_end", "keep_start"):
        raise PrefalignError(f"must be keep_end or keep_start, got {truncation_mode!r}", "--truncation_mode")
    rendered = encode_texts(tokenizer, [prompt_text(e, tokenizer) for e in examples if not isinstance(e.prompt, str)])
    raw = encode_texts(tokenizer, [e.prompt for e in examples if isinstance(e.prompt, str)], special_tokens=True)
    raw_ids, rendered_ids = iter(raw), iter(rendered)
    encoded = [next(raw_ids) if isinstance(e.prompt, str) else next(rendered_ids) for e in examples]
    out, truncated = [], 0
    for ids, example in zip(encoded, examples):
        if not ids:
            raise PrefalignError("the prompt encodes to no tokens", example.source)
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            truncated += 1
            ids = ids[-max_prompt_length:] if truncation_mode == "keep_end" else ids[:max_prompt_length]
        out.append(list(ids))
    return out, truncated
