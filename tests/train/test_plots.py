"""plots.plot_run / plot_stage_accuracy: real PNG files from a metrics.jsonl, clear errors for bad files."""

from __future__ import annotations

import json

import pytest

from prefalign.demo.report import plot_stage_accuracy
from prefalign.errors import PrefalignError
from prefalign.train.metrics import read_metrics as read_metrics_file
from prefalign.train.plots import plot_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _dpo_records():
    # a DPO-like run: train entries every step, eval entries at steps 5 and 10
    recs = [{"step": s, "loss": 0.69 - 0.03 * s, "rewards/margins": 0.1 * s, "rewards/accuracies": min(1.0, 0.5 + 0.05 * s),
             "learning_rate": 1e-6} for s in range(1, 11)]
    recs += [{"step": s, "eval_loss": 0.6 - 0.01 * s, "eval_rewards/margins": 0.08 * s,
              "eval_rewards/accuracies": 0.6} for s in (5, 10)]
    return recs


def test_plot_run_writes_three_pngs(tmp_path):
    _write(tmp_path / "metrics.jsonl", _dpo_records())
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ["loss.png", "rewards_margins.png", "rewards_accuracies.png"]
    for p in paths:
        assert p.parent == tmp_path
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5_000  # a real rendered figure, not an empty file


def test_sft_run_has_only_loss(tmp_path):
    # non-finite values are written as null by the metrics log; they are skipped, not plotted
    _write(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 2.0}, {"step": 2, "loss": None}, {"step": 3, "loss": 1.5}])
    assert [p.name for p in plot_run(tmp_path)] == ["loss.png"]


def test_missing_and_empty_metrics(tmp_path):
    with pytest.raises(PrefalignError, match="no metrics.jsonl"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("\n\n")
    with pytest.raises(PrefalignError, match="empty"):
        plot_run(tmp_path)


def test_bad_line_is_named_by_number(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": \n')
    with pytest.raises(PrefalignError) as e:
        read_metrics_file(path)
    assert str(e.value).startswith(f"{path}:2: not valid JSON")
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(PrefalignError, match=r"metrics.jsonl:2: a metrics line must be a JSON object"):
        read_metrics_file(path)


def test_stage_accuracy_png(tmp_path):
    out = plot_stage_accuracy({"sft": 0.5, "dpo": 0.875}, tmp_path / "sub" / "accuracy.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(PrefalignError, match="no stages"):
        plot_stage_accuracy({}, tmp_path / "x.png")
