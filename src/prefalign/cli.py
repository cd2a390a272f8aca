"""`prefalign <command> [flags]`: each command maps its flags onto a typed config and calls one run function.

A PrefalignError (bad input, bad flag, missing model) is printed as one line on stderr with exit code 2;
Ctrl-C exits with 130 (SIGTERM with 143) after the loop has saved a resumable checkpoint or said why none was.
"""

from __future__ import annotations

import logging
import os
import sys

from prefalign.argparsing import parse_config
from prefalign.commands import COMMANDS, config_class, runner
from prefalign.errors import PrefalignError


def _usage() -> str:
    lines = ["usage: prefalign <command> [flags]   (prefalign <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name:<18} {command.help}" for name, command in COMMANDS.items()]
    return "\n".join(lines)


def _split_command(argv: list[str]) -> tuple[str | None, list[str]]:
    for width in (2, 1):
        name = " ".join(argv[:width])
        if name in COMMANDS:
            return name, argv[width:]
    return None, argv


def _quiet_libraries() -> None:
    """Our own errors are one line each; library chatter (datasets' failed-load log, weight-loading bars) is not."""
    # Imported here, not at the top: `prefalign <command> --help` must not pay for datasets and transformers
    # (about 6 s on 2 cores); this runs only once a command is about to run.
    import datasets
    import transformers

    # bitsandbytes (imported by peft when installed) warns at import that an optional faster CPU kernel package is
    # missing; its own CPU kernels are used instead, so the warning says nothing a user must act on.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # datasets logs a failed JSON parse at ERROR level before raising; our own error names the file and line.
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
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
        if command.positional and rest and not rest[0].startswith("-"):
            rest = [f"--{command.positional}", rest[0], *rest[1:]]
        cfg = parse_config(config_class(name), rest, prog=f"prefalign {name}", description=command.help)
        _quiet_libraries()
        runner(name)(cfg)
    except PrefalignError as e:
        print(f"prefalign {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # 128 + the signal, as shells report it: 130 for Ctrl-C, 143 for SIGTERM
        print("prefalign: interrupted", file=sys.stderr)
        return 128 + int(getattr(e, "signum", 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
