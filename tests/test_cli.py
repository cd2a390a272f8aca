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
