"""The normalised row types of every stage. Raw rows never travel past `data.formats`, `data.sft` and
`data.prompts`: everything later sees these.

A conversational Pair holds the shared context as `prompt` (a list of messages, possibly multi-turn and with a
system message) and the two scored answers as one-message lists `[{"role": "assistant", "content": ...}]`.
A raw-text Pair (format E/F) holds three strings and is tokenized without a chat template.
`source` is "file:line" (1-based) so that every later error can point at the row the user wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# A content is a string or a list of parts: {"type": "text", "text": str} / {"type": "image", "image": ImageRef}
# (data.content normalises them, data.images holds ImageRef).
Content = str | list[dict[str, Any]]
Message = dict[str, Any]  # {"role": str, "content": Content}

# "tool" is allowed because tool results are legitimate history in agentic data; whether the chat template can
# render them is the template's business (built-ins that cannot, say so when rendering).
ROLES = ("system", "user", "assistant", "tool")


def kind(value: Any) -> str:
    """A value's type as error messages name it ("null" for None)."""
    return "null" if value is None else type(value).__name__


def is_blank_prompt(prompt: str | list[Message]) -> bool:
    """A prompt with nothing but whitespace in it (a string, or messages whose contents are all blank): allowed,
    but the model then answers no question, which is rarely what the data meant."""
    if isinstance(prompt, str):
        return not prompt.strip()
    return not any(str(m.get("content") or "").strip() for m in prompt if isinstance(m, dict))


def with_system_prompt(messages: list[Message], system: str | None) -> list[Message]:
    """`messages` led by a system turn with `system` (--system_prompt), unless they already have one."""
    if system is not None and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system}, *messages]
    return messages


@dataclass(frozen=True)
class Pair:
    """One preference pair, validated and normalised."""

    prompt: list[Message] | str
    chosen: list[Message] | str
    rejected: list[Message] | str
    source: str = ""
    margin: float | None = None  # optional reward-model margin column
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # columns kept for reward functions

    @property
    def is_conversational(self) -> bool:
        return not isinstance(self.prompt, str)


@dataclass
class TokenizedPair:
    """Token ids of one pair: the prompt once, and each completion without the prompt."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str = ""
    margin: float | None = None
    images: tuple = ()  # the prompt's images (data.images.ImageRef), in the order their tokens appear

    @property
    def num_tokens(self) -> int:
        """Unique tokens of the pair: the prompt counted once."""
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass(frozen=True)
class UnpairedExample:
    """One piece of unpaired feedback (KTO): a completion of a prompt, labelled desirable (thumbs up) or not.

    Conversational: `prompt` a list of messages, `completion` the assistant turn(s) that follow it; raw text: two
    strings, tokenized without a chat template. A preference pair becomes two of these (chosen desirable, rejected
    undesirable) with the same prompt."""

    prompt: list[Message] | str
    completion: list[Message] | str
    label: bool
    source: str = ""

    @property
    def is_conversational(self) -> bool:
        return not isinstance(self.prompt, str)


@dataclass
class TokenizedUnpaired:
    """Token ids of one unpaired example: the prompt, and the completion without the prompt."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    source: str = ""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass(frozen=True)
class PromptExample:
    """One validated prompt and the row's other columns."""

    prompt: str | list[dict[str, Any]]
    source: str
    columns: dict[str, Any] = field(default_factory=dict)

    @property
    def is_conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass(frozen=True)
class SFTExample:
    """One validated supervised example: a conversation, or raw text with an untrained prefix."""

    source: str
    messages: list[Message] | None = None  # conversational
    train_from: int = 0  # messages[:train_from] are context only (the prompt of a prompt/completion row)
    prompt: str = ""  # raw text: context, never a target under completion_only_loss
    text: str = ""  # raw text: the trained part

    @property
    def is_conversational(self) -> bool:
        return self.messages is not None


@dataclass
class TokenizedSample:
    """Token ids and which of them are targets. `loss_mask[t]` means token t is predicted (from t-1) and scored;
    token 0 never is."""

    input_ids: list[int]
    loss_mask: list[bool]
    source: str = ""

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask[1:])


Segments = list[TokenizedSample]  # a causal-LM row: samples (conversations, document pieces) laid end to end
