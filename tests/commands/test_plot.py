"""`prefalign plot RUN_DIR` through the real CLI entry point: PNGs written next to metrics.jsonl, one-line errors."""

from __future__ import annotations

import json

from prefalign.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_positional_run_dir(tmp_path, capsys):
    # an SFT-like run logs only loss: exactly one PNG, loss.png
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in (1, 2, 3)))
    assert main(["plot", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["loss.png"]
    assert (tmp_path / "loss.png").read_bytes()[:8] == PNG_MAGIC
    assert f"plot: wrote {tmp_path / 'loss.png'}" in capsys.readouterr().out


def test_plot_dpo_run_with_flag(tmp_path):
    recs = [{"step": s, "loss": 0.7, "rewards/margins": 0.1 * s, "rewards/accuracies": 0.5} for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["plot", "--run_dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["loss.png", "rewards_accuracies.png",
                                                               "rewards_margins.png"]


def test_plot_errors_are_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"prefalign plot: error: --run_dir {tmp_path / 'missing'}: no such run directory"
    assert main(["plot", str(tmp_path)]) == 2  # a directory without metrics.jsonl
    assert "no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "learning_rate": 1e-3}) + "\n")
    assert main(["plot", str(tmp_path)]) == 2  # nothing plottable was logged
    assert "none of loss, rewards/margins, rewards/accuracies was logged" in capsys.readouterr().err
    assert main(["plot"]) == 2
