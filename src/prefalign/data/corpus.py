"""Raw text corpora: documents for pretraining and tokenizer training, and pretraining's blocks.

Documents (non-empty lines of .txt files, or a `text` column) are encoded as the tokenizer encodes raw text by
default (with its BOS, if it adds one), each followed by EOS, laid end to end and cut into blocks of --max_length tokens; a document longer than a block continues in
the next one (see `pack_documents`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prefalign.data.load import load_rows
from prefalign.data.tokenize import encode_texts, with_eos
from prefalign.data.types import Segments, TokenizedSample
from prefalign.errors import PrefalignError

logger = logging.getLogger("prefalign.data")


def _txt_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*.txt") if not any(part.startswith(".") for part in p.parts))


def load_texts(name: str, config: str | None = None, split: str = "train", text_field: str = "text",
               conversations: bool = False, skip_invalid: bool = False) -> list[tuple[str, str]]:
    """(text, source) documents: non-empty lines of .txt files, or the `text_field` column of any format
    `load_rows` reads. With `conversations`, rows without that column contribute the contents of their
    messages / prompt / completion / chosen / rejected columns (for training a tokenizer). A row with no text
    is an error naming it, or, with `skip_invalid` (--skip_invalid_rows), skipped and counted in one warning."""
    path = Path(name).expanduser()
    txt = _txt_files(path) if path.suffix == ".txt" or path.is_dir() else []  # a directory without any: []
    if path.suffix == ".txt" and not path.is_file():
        raise PrefalignError("no such file", name)
    if txt:
        docs = []
        for f in txt:
            lines = f.read_text(encoding="utf-8", errors="replace").splitlines()
            docs += [(line, f"{f}:{i}") for i, line in enumerate(lines, start=1) if line.strip()]
        if not docs:
            raise PrefalignError("no non-empty lines", name)
        return docs
    out: list[tuple[str, str]] = []
    rows = load_rows(name, config, split)
    errors: list[PrefalignError] = []
    for row, source in rows:
        value = row.get(text_field)
        if isinstance(value, str):
            if value.strip():
                out.append((value, source))
            continue
        pieces = list(_row_strings(row)) if conversations else []
        if not pieces:
            present = ", ".join(sorted(row)) or "none"
            errors.append(PrefalignError(f"no '{text_field}' column with a string (columns present: {present})", source))
            if not skip_invalid:
                raise errors[0]
        out += [(p, source) for p in pieces]
    if errors:
        logger.warning("%s: skipped %d invalid rows of %d (first: %s)", name, len(errors), len(rows), errors[0])
        if not out:
            raise PrefalignError(f"all {len(rows)} rows are invalid; first: {errors[0]}", where=name)
    return out


def _row_strings(row: dict[str, Any]) -> Iterable[str]:
    for column in ("messages", "prompt", "completion", "chosen", "rejected"):
        value = row.get(column)
        if isinstance(value, str) and value:
            yield value
        elif isinstance(value, list):
            for m in value:
                content = m.get("content") if isinstance(m, dict) else None
                if isinstance(content, str):
                    yield content
                elif isinstance(content, list):  # content parts: their text (images have none to learn)
                    yield from (p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))


def pack_documents(docs: list[list[int]], block_size: int, per_document: bool) -> list[Segments]:
    """Blocks of `block_size` tokens from the documents laid end to end (the last block may be shorter).

    per_document: a block is a list of segments, one per document piece, each starting untargeted;
    otherwise one segment per block whose first token is the only untargeted one.
    """
    blocks: list[Segments] = []
    current: Segments = []
    used = 0
    for doc in docs:
        start = 0
        while start < len(doc):
            take = min(len(doc) - start, block_size - used)
            piece = doc[start:start + take]
            current.append(TokenizedSample(piece, [False] + [True] * (len(piece) - 1)))
            used += take
            start += take
            if used == block_size:
                blocks.append(current)
                current, used = [], 0
    if current:
        blocks.append(current)
    if not per_document:
        blocks = [[TokenizedSample(ids, [False] + [True] * (len(ids) - 1))]
                  for ids in ([t for seg in block for t in seg.input_ids] for block in blocks)]
    # a block without targets (say, a trailing single token) would give a step of weight 0: leave it out
    return [b for b in blocks if any(seg.num_loss_tokens for seg in b)]


def encode_documents(texts: list[str], tokenizer: Any) -> list[list[int]]:
    """Token ids of each document as the tokenizer encodes raw text by default (a BOS its post-processor adds
    starts every document, as in transformers' run_clm and MiniMind), with EOS appended."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise PrefalignError("the tokenizer has no EOS token to separate documents", "--tokenizer_name_or_path")
    return [with_eos(ids, eos) for ids in encode_texts(tokenizer, texts, special_tokens=True)]
