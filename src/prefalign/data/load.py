"""Load preference rows from local files, a directory of them, or a hub dataset, and normalise them to Pairs.

Everything goes through `datasets.load_dataset`; what this module adds is the place each row came from
("path:line") and errors that name it. Arrow's own parse errors say "row 1" of some internal block, so when
a JSON Lines file fails to load, the file is scanned here to find the first line that is not a JSON object.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import datasets

from prefalign.config import DataArgs
from prefalign.data.formats import normalize_pair
from prefalign.data.templates import prompt_template_warning
from prefalign.data.types import Pair, is_blank_prompt
from prefalign.errors import PrefalignError

T = TypeVar("T")

logger = logging.getLogger("prefalign.data")

# file suffix -> datasets builder
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

Row = tuple[dict[str, Any], str]  # (row, source)


def load_rows(name: str, config: str | None = None, split: str = "train") -> list[Row]:
    """Rows of a local file / directory (`split` picks files named after it, if any) or of a hub dataset."""
    path = Path(name).expanduser()
    if path.is_file():
        return _load_file(path)
    if path.is_dir():
        rows: list[Row] = []
        for f in _data_files(path, split):
            rows.extend(_load_file(f))
        return rows
    if Path(name).suffix in BUILDERS or name.startswith((".", "/", "~")):
        raise PrefalignError("no such file or directory", where=name)
    return _load_hub(name, config, split)


def _data_files(directory: Path, split: str) -> list[Path]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in BUILDERS
                   and not any(part.startswith(".") for part in p.relative_to(directory).parts))
    if not files:
        raise PrefalignError(f"no {'/'.join(BUILDERS)} files in this directory", where=str(directory))
    # the hub's convention: train.jsonl / data/test-00000.parquet name their split; else every file is "train"
    named = [f for f in files if split in f.stem.replace("_", "-").split("-")]
    if named:
        return named
    if split != "train":
        raise PrefalignError(f"no file named after split '{split}' in this directory", where=str(directory))
    return files


def _load_file(path: Path) -> list[Row]:
    if path.suffix not in BUILDERS:
        raise PrefalignError(f"unsupported file type '{path.suffix}' (use {', '.join(BUILDERS)})", where=str(path))
    data = path.read_bytes()  # read once: the emptiness check, line numbers and error lines all use it
    if not data.strip():
        raise PrefalignError("empty file", where=str(path))
    try:
        with _quiet(datasets):
            ds = datasets.load_dataset(BUILDERS[path.suffix], data_files=[str(path)], split="train")
        rows = ds.to_list()
    except Exception as e:  # Arrow / datasets errors: find the line they mean ourselves
        if path.suffix in (".jsonl", ".json"):
            return _rows_from_json(path, data, e)
        raise PrefalignError(f"cannot read {path.suffix[1:]} file: {_one_line(e)}", where=str(path)) from e
    if len(rows) == 1 and path.suffix in (".jsonl", ".json"):
        _refuse_column_layout(rows[0], path)
    return list(zip(rows, _sources(path, data, len(rows))))


def _refuse_column_layout(row: dict[str, Any], path: Path) -> None:
    """A file holding one object of columns ({"prompt": [...], "chosen": [...]}, as pandas' to_json(orient="list")
    writes) loads as a single row of lists; say so instead of failing later on "message 0 must be an object". A row
    whose lists hold messages ({"role": ..., "content": ...}) is a real single conversational row."""
    columns = list(row.values())
    if not columns or not all(isinstance(c, list) and c for c in columns):
        return
    if len({len(c) for c in columns}) != 1:
        return
    if any(isinstance(item, dict) and "role" in item for c in columns for item in c):
        return
    raise PrefalignError(f"column-oriented JSON (one object of {len(columns)} columns holding {len(columns[0])} "
                         "values each); write one object per row instead: JSON Lines, or a JSON array of objects",
                         where=str(path))


def _sources(path: Path, data: bytes, n: int) -> list[str]:
    if path.suffix == ".csv":  # line 1 is the header (multi-line quoted fields would shift this)
        return [f"{path}:{i + 2}" for i in range(n)]
    if path.suffix == ".jsonl" or (path.suffix == ".json" and not _is_json_array(data)):
        lines = [i + 1 for i, raw in enumerate(data.splitlines()) if raw.strip()]
        if len(lines) == n:  # physical lines, counting blank ones
            return [f"{path}:{line}" for line in lines]
    return [f"{path}:row {i}" for i in range(n)]


def _is_json_array(data: bytes) -> bool:
    return data[:4096].lstrip().startswith(b"[")


def _rows_from_json(path: Path, data: bytes, cause: Exception) -> list[Row]:
    """datasets could not load a JSON file: name the first bad line; if every line is fine (Arrow refuses
    e.g. a column that is a string in one row and a list in another), use the rows as Python parsed them."""
    if _is_json_array(data):
        try:
            rows = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise PrefalignError(f"not UTF-8 text (byte {e.start})", where=str(path)) from e
        except json.JSONDecodeError as e:
            raise PrefalignError(f"invalid JSON: {e.msg} (column {e.colno})", where=f"{path}:{e.lineno}") from e
        return [(r, f"{path}:row {i}") for i, r in enumerate(rows)]
    if path.suffix == ".json":  # one object, perhaps pretty-printed over many lines
        try:
            whole = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            whole = None
        if isinstance(whole, dict):
            _refuse_column_layout(whole, path)
    out: list[Row] = []
    for lineno, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise PrefalignError(f"not UTF-8 text (byte {e.start} of the line)", where=where) from e
        except json.JSONDecodeError as e:
            raise PrefalignError(f"invalid JSON: {e.msg} (column {e.colno})", where=where) from e
        if not isinstance(row, dict):
            raise PrefalignError(f"each line must be a JSON object, got {type(row).__name__}", where=where)
        out.append((row, where))
    if not out:
        raise PrefalignError(f"no rows ({_one_line(cause)})", where=str(path))
    return out


def _load_hub(name: str, config: str | None, split: str) -> list[Row]:
    try:
        with _quiet(datasets):
            ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown id, unknown split: all the user's to fix
        raise PrefalignError(f"cannot load dataset: {_one_line(e)}", where=name) from e
    return [(row, f"{name}[{split}]:row {i}") for i, row in enumerate(ds)]


@contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
    """No progress bars for a local file that loads in milliseconds."""
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if e.__cause__ is not None and str(e.__cause__):
        text += f" ({' '.join(str(e.__cause__).split())})"
    return text[:500]


def normalize_rows(rows: list[Row], args: DataArgs, what: str,
                   normalize: Callable[[dict[str, Any], str, Any], T] = normalize_pair) -> list[T]:  # type: ignore[assignment]
    """Validated examples from raw rows (pairs by default; SFT rows and prompts pass their own `normalize`); with
    --skip_invalid_rows bad rows are counted and reported in one line, otherwise the first one stops the run."""
    if not rows:
        raise PrefalignError("no rows", where=what)
    out: list[T] = []
    errors: list[PrefalignError] = []
    for row, source in rows:
        try:
            out.append(normalize(row, source, args))
        except PrefalignError as e:
            if not args.skip_invalid_rows:
                raise
            errors.append(e)
    if errors:
        logger.warning("%s: skipped %d invalid rows of %d (first: %s)", what, len(errors), len(rows), errors[0])
    blank = blank_prompt_rows(rows, getattr(args, "prompt_column", "prompt"))
    if blank:
        logger.warning("%s: %d of %d rows have an empty or whitespace-only '%s' column (first: %s); the model is "
                       "trained on them with no question to answer", what, len(blank), len(rows),
                       getattr(args, "prompt_column", "prompt"), blank[0])
    if not out:
        raise PrefalignError(f"all {len(rows)} rows are invalid; first: {errors[0]}", where=what)
    return out


def blank_prompt_rows(rows: list[Row], column: str) -> list[str]:
    """Sources of the rows whose prompt column is present but empty or whitespace only (a string, or messages whose
    contents all are). Allowed (a row may have no context), but rarely what the data meant."""
    return [source for row, source in rows
            if isinstance(row, dict) and isinstance(row.get(column), (str, list)) and is_blank_prompt(row[column])]


def split_holdout(items: list[T], ratio: float, seed: int) -> tuple[list[T], list[T]]:
    """Hold out round(ratio * n) items (at least 1) chosen by `seed`; both parts keep file order."""
    if not 0.0 < ratio < 1.0:
        raise PrefalignError(f"must be between 0 and 1, got {ratio}", where="--eval_split_ratio")
    n_eval = max(1, round(ratio * len(items)))
    if n_eval >= len(items):
        raise PrefalignError(
            f"holding out {n_eval} of {len(items)} rows leaves none to train on", where="--eval_split_ratio")
    held = set(random.Random(seed).sample(range(len(items)), n_eval))
    train = [x for i, x in enumerate(items) if i not in held]
    return train, [x for i, x in enumerate(items) if i in held]


def load_examples(args: DataArgs, normalize: Callable[[dict[str, Any], str, Any], T]) -> tuple[list[T], list[T] | None]:
    """(train, eval) examples. Eval comes from --eval_dataset_name, else --eval_split_ratio of the training rows
    (seeded by the run's --seed when `args` carries one), else None."""
    if not args.dataset_name:
        raise PrefalignError("no training data given", where="--dataset_name")
    warning = prompt_template_warning(getattr(args, "prompt_template", None))
    if warning:
        logger.warning("warning: %s", warning)
    rows = load_rows(args.dataset_name, args.dataset_config, args.dataset_split)
    train = normalize_rows(rows, args, args.dataset_name, normalize)
    if args.eval_dataset_name:
        rows = load_rows(args.eval_dataset_name, args.eval_dataset_config, args.eval_dataset_split)
        return train, normalize_rows(rows, args, args.eval_dataset_name, normalize)
    if args.eval_split_ratio:
        return split_holdout(train, args.eval_split_ratio, int(getattr(args, "seed", 42)))
    return train, None


def load_pairs(args: DataArgs) -> tuple[list[Pair], list[Pair] | None]:
    """(train, eval) preference pairs (see load_examples)."""
    return load_examples(args, normalize_pair)
