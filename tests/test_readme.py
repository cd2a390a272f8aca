"""The README stays true: its flag tables are the ones the config docstrings generate, and it names the two commands."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from flags_table import BEGIN, END, format_default, tables  # noqa: E402


def test_flag_tables_are_current():
    text = (ROOT / "README.md").read_text()
    generated = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    assert generated.strip() == tables().strip(), "run: python scripts/flags_table.py --write"


def test_flag_table_defaults_are_the_commands_own():
    """Read back from README.md, independently of the generator: each table is titled with the commands it holds
    ("**Training (dpo, kto)**"); a row marked "(dpo)" holds for that command only. Every flag of `prefalign dpo` and
    `prefalign kto` is listed once per command, with the default the command really runs with (a table built from
    the shared groups would show TrainArgs' learning_rate 5e-05, not DPO's 1e-06)."""
    import dataclasses
    import re

    from prefalign.config import DPOConfig, KTOConfig

    text = (ROOT / "README.md").read_text()
    listed: dict[str, dict[str, list[str]]] = {"dpo": {}, "kto": {}}
    commands: list[str] = []
    for line in text[text.index(BEGIN):text.index(END)].splitlines():
        title = re.fullmatch(r"\*\*.*\((.*)\)\*\*", line)
        if title:
            commands = title.group(1).split(", ")
        elif line.startswith("| `--"):
            cells = line.split(" | ")
            flag = re.fullmatch(r"\| `--(\w+)`(?: \((\w+)\))?", cells[0])
            for command in ([flag.group(2)] if flag.group(2) else commands):
                listed[command].setdefault(flag.group(1), []).append(cells[1])
    for command, config in (("dpo", DPOConfig), ("kto", KTOConfig)):
        defaults = config()
        assert set(listed[command]) == {f.name for f in dataclasses.fields(config)}, command
        for name, shown in listed[command].items():
            assert shown == [format_default(getattr(defaults, name))], (command, name)
    assert listed["dpo"]["learning_rate"] == ["1e-06"]


def test_readme_names_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "make demo" in text and "make test" in text
    assert "make test" in (ROOT / ".ci" / "run").read_text()
