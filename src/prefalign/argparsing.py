"""Command line and YAML for the typed configs: flags are generated from the dataclass fields, help from their
attribute docstrings (config.field_help). Precedence: defaults < --config YAML < flags given on the command line.

Every bad value becomes a one-line PrefalignError naming the flag (or the YAML file and key). Flags must be written
out in full: argparse's prefix matching is off, so a typo such as `--learning_rat` is an error, never another flag.
A YAML mapping that repeats a key is refused (PyYAML would silently keep the last one). A list flag takes a YAML
list, or a string of items separated by commas and/or spaces (`loss_type: sigmoid, ipo`), except the flags whose
items may themselves hold spaces or commas (`--reward_funcs regex:PATTERN`): a string there is one item.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from prefalign.config import field_help
from prefalign.errors import PrefalignError

C = TypeVar("C")
_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}
_SEPARATORS = re.compile(r"[,\s]+")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises PrefalignError instead of printing usage and exiting, so the CLI prints one line."""

    def error(self, message: str) -> typing.NoReturn:
        raise PrefalignError(message)  # the CLI's "prefalign <command>: error: " already names the command


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, accepts None) for `X | None` / Optional[X]."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _scalar(tp: Any, value: Any) -> Any:
    if tp is bool:
        return parse_bool(value)
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
        if not math.isfinite(number):  # nan/inf would reach torch.optim or the losses as a traceback
            raise ValueError(f"expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"expected a string, got {value!r}")
        return str(value)
    return value


def _items(value: Any, verbatim: bool) -> list[Any]:
    """The items of a list value: a YAML list, or a string of items separated by commas and/or whitespace (each
    command-line word is split the same way); `verbatim` items are never split."""
    values = value if isinstance(value, list) else [value]
    if verbatim:
        return [v for v in values if v != ""]
    return [piece for v in values for piece in (_SEPARATORS.split(v.strip()) if isinstance(v, str) else [v])
            if piece != ""]


def coerce(tp: Any, value: Any, verbatim: bool = False) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ValueError saying what was expected.
    `verbatim`: the items of a list field are taken whole (see `_items`)."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in {"none", "null"}):
        if optional:
            return None
        raise ValueError("a value is required")
    if typing.get_origin(inner) is list:
        (elem,) = typing.get_args(inner)
        return [_scalar(elem, v) for v in _items(value, verbatim)]
    return _scalar(inner, value)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build_parser(cls: type, prog: str, description: str = "") -> ArgumentParser:
    """A parser with one flag per config field; flags absent from the command line stay absent (SUPPRESS)."""
    # allow_abbrev=False: `--learning_rat` must not silently set --learning_rate
    parser = ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS,
                            allow_abbrev=False)
    parser.add_argument("--config", help="YAML file of flag values; flags on the command line override it.")
    helps = field_help(cls)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner, _ = _unwrap_optional(tp)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{helps.get(f.name, '')} (default: {default})".replace("%", "%%")
        if inner is bool:
            parser.add_argument(f"--{f.name}", nargs="?", const="true", metavar="true|false", help=help_text)
        elif typing.get_origin(inner) is list:
            parser.add_argument(f"--{f.name}", nargs="+", metavar="VALUE", help=help_text)
        else:
            parser.add_argument(f"--{f.name}", metavar=getattr(inner, "__name__", "VALUE").upper(), help=help_text)
    return parser


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that repeats a key (which would otherwise keep the last value)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """The YAML document in `path` (safe loading, duplicate keys refused); errors name the file and line."""
    try:
        return yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f"{path}:{line + 1}" if line is not None else str(path)
        raise PrefalignError(f"invalid YAML ({getattr(e, 'problem', e)})", where) from None


def load_yaml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise PrefalignError("no such file", f"--config {path}")
    data = read_yaml(p) or {}
    if not isinstance(data, dict):
        raise PrefalignError("expected a mapping of flag names to values", path)
    return data


def make_config(cls: type[C], values: dict[str, Any], source: str = "") -> C:
    """Build `cls` from a dict of raw values (YAML or flags), coercing and naming any bad key or value."""
    return cls(**_coerce_values(cls, values, source))


def _coerce_values(cls: type, values: dict[str, Any], source: str = "") -> dict[str, Any]:
    """`values` coerced to the field types of `cls`; an unknown key or bad value names `source` (or the flag)."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, raw in values.items():
        where = f"{source} key {key!r}" if source else f"--{key}"
        if key not in fields:
            raise PrefalignError("unknown option (see --help for the list)", where)
        try:
            kwargs[key] = coerce(hints[key], raw, verbatim=fields[key].metadata.get("verbatim_items", False))
        except ValueError as e:
            raise PrefalignError(str(e), where) from None
    return kwargs


def parse_config(cls: type[C], argv: list[str] | None, prog: str, description: str = "") -> C:
    """defaults < YAML (--config) < command line."""
    ns = vars(build_parser(cls, prog, description).parse_args(argv))
    values: dict[str, Any] = {}
    config_path = ns.pop("config", None)
    if config_path:  # YAML keys are checked with the file named in any error
        values.update(_coerce_values(cls, load_yaml(config_path), source=config_path))
    values.update(_coerce_values(cls, ns))
    return cls(**values)
