"""The README stays true: its flag tables are the ones the config docstrings generate, and it names the two commands."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from flags_table import BEGIN, END, tables  # noqa: E402


def test_flag_tables_are_current():
    text = (ROOT / "README.md").read_text()
    generated = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    assert generated.strip() == tables().strip(), "run: python scripts/flags_table.py --write"


def test_readme_names_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "make demo" in text and "make test" in text
    assert "make test" in (ROOT / ".ci" / "run").read_text()
