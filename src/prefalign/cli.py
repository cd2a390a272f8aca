"""`prefalign <command> [flags]`: each command maps its flags onto a typed config and calls one run function.

A PrefalignError (bad input, bad flag, missing model) is printed as one line on stderr with exit code 2; when
the user's own code raised (a reward function, a reward file), its traceback comes first, then that one line.
Ctrl-C exits with 130 (SIGTERM with 143) after the loop has saved a resumable checkpoint or said why none was.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

from prefalign import __version__
from prefalign.argparsing import parse_config
from prefalign.commands import COMMANDS, config_class, runner
from prefalign.errors import PrefalignError, UserCodeError


def _usage(group: str | None = None) -> str:
    """The command list; with `group` ("data"), only that group's subcommands."""
    if group is None:
        lines = ["usage: prefalign <command> [flags]   (prefalign <command> --help for its flags;"
                 " prefalign --version)", "", "commands:"]
        names = list(COMMANDS)
    else:
        lines = [f"usage: prefalign {group} <subcommand> [flags]   (prefalign {group} <subcommand> --help for its "
                 "flags)", "", f"{group} subcommands:"]
        names = _group_members(group)
    lines += [f"  {name:<18} {COMMANDS[name].help}" for name in names]
    return "\n".join(lines)


def _group_members(word: str) -> list[str]:
    """The two-word commands whose first word is `word` (`data` -> ["data inspect"])."""
    return [name for name in COMMANDS if name.split()[0] == word and " " in name]


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
    from prefalign.train.zero import name_cpu_accelerator  # light: torch is loaded by now

    name_cpu_accelerator()


def _print_user_traceback(error: BaseException) -> None:
    """The traceback of an exception the user's code raised, from the frame that called it on: their lines."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("prefalign."):
        tb = tb.tb_next  # skip our own frames (the caller of the user's function)
    traceback.print_exception(type(error), error, tb, file=sys.stderr)


def _close_process_group() -> None:
    """A launched run's processes end together (see train.distributed.close_process_group)."""
    if "torch.distributed" in sys.modules:  # nothing to close when the command never loaded torch
        from prefalign.train.distributed import close_process_group

        close_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"prefalign {__version__}")
        return 0
    name, rest = _split_command(argv)
    if name is None and _group_members(argv[0]):  # `prefalign data`, `prefalign data --help`, `prefalign data x`
        if len(argv) == 1 or argv[1] in ("-h", "--help", "help"):
            print(_usage(argv[0]))
            return 0
        print(f"prefalign {argv[0]}: error: unknown subcommand {argv[1]!r}\n\n{_usage(argv[0])}", file=sys.stderr)
        return 2
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
        _close_process_group()
    except PrefalignError as e:
        if isinstance(e, UserCodeError) and e.__cause__ is not None:
            _print_user_traceback(e.__cause__)
        print(f"prefalign {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # 128 + the signal, as shells report it: 130 for Ctrl-C, 143 for SIGTERM
        print("prefalign: interrupted", file=sys.stderr)
        return 128 + int(getattr(e, "signum", 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
