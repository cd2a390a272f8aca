"""`prefalign <command> [flags]`: each command maps its flags onto a typed config and calls one run function.

A PrefalignError (bad input, bad flag, missing model) is printed as one line on stderr with exit code 2;
Ctrl-C exits with 130 after the loop has saved a resumable checkpoint.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefalign.errors import PrefalignError


@dataclass
class Command:
    config: Callable[[], type]  # lazily imported config class
    run: Callable[[Any], Any]
    help: str


def _dpo_config() -> type:
    from prefalign.config import DPOConfig

    return DPOConfig


def _run_dpo(cfg: Any) -> None:
    from prefalign.train.dpo import train_dpo

    result = train_dpo(cfg)
    summary = ", ".join(f"{k}={v:.4g}" for k, v in result.last_metrics.items() if k in ("loss", "rewards/accuracies",
                                                                                        "rewards/margins"))
    print(f"dpo: {result.state.global_step} steps, {summary}; model saved to {cfg.output_dir}")


def _inspect_config() -> type:
    from prefalign.config import DataArgs, ModelArgs

    @dataclass
    class InspectConfig(DataArgs, ModelArgs):
        row: int | None = None
        """Show this row (0-based) in detail (default: the first)."""

    return InspectConfig


def _run_inspect(cfg: Any) -> None:
    from prefalign.data.inspect import inspect_dataset
    from prefalign.data.templates import resolve_chat_template
    from prefalign.model.load import load_tokenizer

    if not cfg.model_name_or_path and not cfg.tokenizer_name_or_path:
        raise PrefalignError("is required (the tokenizer to render with)", "--model_name_or_path")
    if not cfg.dataset_name:
        raise PrefalignError("is required", "--dataset_name")
    tokenizer = load_tokenizer(cfg)
    resolve_chat_template(tokenizer, cfg.chat_template)
    print(inspect_dataset(cfg, tokenizer, row=cfg.row))


COMMANDS: dict[str, Command] = {
    "dpo": Command(_dpo_config, _run_dpo, "Direct preference optimisation (and its variants) on preference pairs."),
    "data inspect": Command(_inspect_config, _run_inspect,
                            "Show how a row is rendered and tokenized, which tokens are scored, and length statistics."),
}


def _usage() -> str:
    lines = ["usage: prefalign <command> [flags]   (prefalign <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name:<18} {cmd.help}" for name, cmd in COMMANDS.items()]
    return "\n".join(lines)


def _split_command(argv: list[str]) -> tuple[str | None, list[str]]:
    for width in (2, 1):
        name = " ".join(argv[:width])
        if name in COMMANDS:
            return name, argv[width:]
    return None, argv


def main(argv: list[str] | None = None) -> int:
    from prefalign.argparsing import parse_config

    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = _split_command(argv)
    if name is None:
        print(f"prefalign: error: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    command = COMMANDS[name]
    try:
        cfg = parse_config(command.config(), rest, prog=f"prefalign {name}", description=command.help)
        command.run(cfg)
    except PrefalignError as e:
        print(f"prefalign {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prefalign: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
