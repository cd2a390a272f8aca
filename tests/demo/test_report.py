"""demo.report.write_report: report.json round-trips the dict plus checks; report.md shows table, checks, samples, plots."""

from __future__ import annotations

import json

import pytest

from prefalign.demo.report import gains, write_report
from prefalign.errors import PrefalignError


def _report():
    return {
        "stages": {
            "sft": {"accuracy": 0.5, "wall_time_s": 90.0},
            "dpo": {"accuracy": 0.875, "kl": 2.5, "reward_accuracy": 0.96875, "wall_time_s": 120.25},
            "grpo": {"accuracy": 0.625, "wall_time_s": 100.0},
        },
        "required_gain": {"dpo": 0.30, "grpo": 0.20},
        "samples": [{"prompt": "What is 37 + 48?", "reference": "37 + 48 = 85", "sft": "37 + 48 = 75",
                     "dpo": "37 + 48 = 85"}],
        "plots": ["accuracy.png", "dpo/loss.png"],
        "total_wall_time_s": 310.25,
        "settings": {"vocab_size": 272},
    }


def test_gains_pass_and_fail():
    # dpo: 0.875 - 0.5 = 0.375 >= 0.30 passes; grpo: 0.625 - 0.5 = 0.125 < 0.20 fails
    g = gains(_report())
    assert g["dpo"] == {"gain": 0.375, "required": 0.30, "passed": True, "baseline": "sft"}
    assert g["grpo"] == {"gain": 0.125, "required": 0.20, "passed": False, "baseline": "sft"}


def test_teacher_gap_checks_a_student_against_its_teacher():
    report = _report()
    report["stages"]["distill"] = {"accuracy": 0.8}
    report["stages"]["small"] = {"accuracy": 0.7}
    report["teacher_gap"] = {"distill": {"teacher": "dpo", "max_gap": 0.10},
                             "small": {"teacher": "dpo", "max_gap": 0.10}}
    g = gains(report)
    assert g["distill"] == {"gain": pytest.approx(-0.075), "required": -0.10, "passed": True, "baseline": "dpo"}
    assert g["small"]["passed"] is False  # 0.7 is 0.175 below its teacher


def test_write_report_files(tmp_path):
    json_path, md_path = write_report(tmp_path / "out", _report())
    assert json_path == tmp_path / "out" / "report.json" and md_path == tmp_path / "out" / "report.md"
    data = json.loads(json_path.read_text())
    assert data["stages"]["dpo"] == {"accuracy": 0.875, "kl": 2.5, "reward_accuracy": 0.96875, "wall_time_s": 120.25}
    assert data["checks"]["grpo"]["passed"] is False
    md = md_path.read_text()
    assert "| dpo | 0.875 | +0.375 | 2.500 | 0.969 | 120.250 |" in md
    assert "| sft | 0.500 | - | - | - | 90.000 |" in md
    assert "- PASS: dpo gains +0.375" in md and "- FAIL: grpo gains +0.125" in md
    assert "| What is 37 + 48? | 37 + 48 = 85 | 37 + 48 = 75 | 37 + 48 = 85 |" in md
    assert "![dpo/loss.png](dpo/loss.png)" in md and "![accuracy.png](accuracy.png)" in md
    assert "Total wall time: 310.2 s" in md


def test_markdown_cells_are_escaped(tmp_path):
    r = {"stages": {"sft": {"accuracy": 0.5}}, "samples": [{"prompt": "a|b", "sft": "x\ny"}]}
    _, md = write_report(tmp_path, r)
    assert "| a\\|b | x ⏎ y |" in md.read_text()


@pytest.mark.parametrize("bad", [{}, {"stages": {}}, {"stages": {"sft": {}}}, {"stages": {"sft": {"accuracy": 1.5}}}])
def test_invalid_report(tmp_path, bad):
    with pytest.raises(PrefalignError, match="report"):
        write_report(tmp_path, bad)
    assert not (tmp_path / "report.json").exists()


def test_quick_runs_say_not_checked_instead_of_fail(tmp_path):
    """--quick trains far too little for the targets: its report must not print FAIL for a machinery check."""
    from prefalign.demo.pipeline import summary

    report = {**_report(), "settings": {"quick": True}, "this_run_wall_time_s": 30.0}
    _, md_path = write_report(tmp_path, report)
    md = md_path.read_text()
    assert "FAIL" not in md and "PASS" not in md
    assert "- not checked (quick): grpo gains +0.125 over sft (needs >= +0.20)" in md
    assert "quick mode checks the machinery, not the accuracy targets" in md
    text = summary(report, md_path)
    assert "FAIL" not in text and "not checked (quick): grpo gains +0.125 over sft (needs >= +0.20)" in text
    assert "note: quick mode checks the machinery, not the accuracy targets (run without --quick for those)" in text
    full = summary({**report, "settings": {"quick": False}}, md_path)
    assert "FAIL: grpo gains +0.125 over sft (needs >= +0.20)" in full and "PASS: dpo gains +0.375" in full
