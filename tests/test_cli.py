"""Every command `prefalign --help` lists exists: its module imports, has CONFIG and run_command, and --help renders."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from prefalign.argparsing import build_parser
from prefalign.cli import main
from prefalign.commands import COMMANDS, config_class


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_module_is_complete(name):
    module = importlib.import_module(f"prefalign.commands.{COMMANDS[name].module}")
    assert dataclasses.is_dataclass(config_class(name)) and callable(module.run_command)
    text = build_parser(config_class(name), f"prefalign {name}").format_help()
    assert "--" in text


def test_top_level_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main(["dpoo"]) == 2
    assert "unknown command 'dpoo'" in capsys.readouterr().err


def test_version(capsys):
    from prefalign import __version__

    assert main(["--version"]) == 0 and capsys.readouterr().out == f"prefalign {__version__}\n"


def test_a_command_group_alone_lists_its_subcommands(capsys):
    assert main(["data"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: prefalign data <subcommand>") and "  data inspect  " in out and "dpo" not in out
    assert main(["data", "--help"]) == 0 and "data inspect" in capsys.readouterr().out
    assert main(["data", "inspekt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prefalign data: error: unknown subcommand 'inspekt'") and "data inspect" in err
