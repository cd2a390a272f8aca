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
    """Read back from README.md, independently of the generator: every flag of `prefalign dpo` is listed once
    with the default the command really runs with (a table built from the shared groups would show TrainArgs'
    learning_rate 5e-05, not DPO's 1e-06)."""
    import dataclasses

    from prefalign.config import DPOConfig

    text = (ROOT / "README.md").read_text()
    rows = [line.split(" | ") for line in text[text.index(BEGIN):text.index(END)].splitlines()
            if line.startswith("| `--")]
    listed = {cells[0].strip("| `-"): cells[1] for cells in rows}
    assert len(listed) == len(rows)  # no flag twice
    defaults = DPOConfig()
    assert set(listed) == {f.name for f in dataclasses.fields(DPOConfig)}
    for name, shown in listed.items():
        assert shown == format_default(getattr(defaults, name)), name
    assert listed["learning_rate"] == "1e-06"


def test_readme_names_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "make demo" in text and "make test" in text
    assert "make test" in (ROOT / ".ci" / "run").read_text()
