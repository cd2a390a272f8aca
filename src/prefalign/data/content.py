"""Message contents: a string, or a list of content parts as TRL and transformers write them,
`[{"type": "image", "image": ...}, {"type": "text", "text": "..."}]`.

`normalize_content` validates one message's content once, when the row is read: text parts keep their text,
image parts become `data.images.ImageRef` (checked there: missing files, URLs and bad data stop the run at the
row). Keys that Arrow filled with None (every part of a column gets every other part's keys) are dropped, so
equal messages compare equal. An image part's value may sit under "image", "path", "url" or "base64", the keys
transformers' processors read.
"""

from __future__ import annotations

from typing import Any

from prefalign.data.images import ImageRef, parse_image
from prefalign.data.types import Content, Message
from prefalign.data.types import kind as _kind
from prefalign.errors import PrefalignError

IMAGE_KEYS = ("image", "path", "url", "base64")


def normalize_content(content: Any, where: str, source: str) -> Content:
    """A message's content as a string or a list of normalised parts; PrefalignError naming `where` otherwise."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise PrefalignError(f"{where} content must be a string or a list of content parts, got {_kind(content)}",
                             where=source)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        label = f"{where} part {j}"
        if not isinstance(part, dict):
            raise PrefalignError(f"{label} must be an object with a 'type', got {_kind(part)}", where=source)
        part = {k: v for k, v in part.items() if v is not None}
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise PrefalignError(f"{label} is a text part without a string 'text'", where=source)
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image":
            value = next((part[k] for k in IMAGE_KEYS if k in part), None)
            if value is None:
                raise PrefalignError(f"{label} is an image part without an image (give one of "
                                     f"{', '.join(IMAGE_KEYS)})", where=source)
            parts.append({"type": "image", "image": parse_image(value, label, source)})
        else:
            raise PrefalignError(f"{label} has type {kind!r}; content parts are 'text' or 'image'", where=source)
    return parts


def text_of(content: Content) -> str:
    """The text of a content: the string itself, or its text parts joined with nothing between them."""
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content if p["type"] == "text")


def images_of(messages: list[Message]) -> list[ImageRef]:
    """Every image of `messages`, in the order a template writes them."""
    return [p["image"] for m in messages if isinstance(m["content"], list) for p in m["content"]
            if p["type"] == "image"]


def has_parts(messages: list[Message]) -> bool:
    """Whether any message's content is a list of parts rather than a string."""
    return any(isinstance(m.get("content"), list) for m in messages)


def refuse_images(messages: list[Message], source: str, stage: str) -> None:
    """A one-line error for image parts in a stage that only trains on text."""
    if images_of(messages):
        raise PrefalignError(f"the row has an image part; {stage} trains on text only (text parts work), images are "
                             "supported by `prefalign dpo`, `prefalign eval` and `data inspect`", where=source)
