"""Bad input through the real CLI, as a newcomer meets it: every case is one line on stderr (exit 2), and a run
that fails leaves what an earlier run wrote into the same --output_dir exactly as it was (issues 16 and 18).

One earlier DPO run (module fixture) is the output every failing command below points at, with
--overwrite_output_dir, so nothing but the failure itself keeps the files from being replaced."""

from __future__ import annotations

import json
import logging
import math

import pytest

from helpers import build_tokenizer, conv, run_cli, write_jsonl
from prefalign.train.metrics import read_metrics


def _pairs(n: int = 8) -> list[dict]:
    return [{"prompt": conv(("user", f"what is {i} + 1")), "chosen": conv(("assistant", f"{i + 1}")),
             "rejected": conv(("assistant", f"{i + 2} no"))} for i in range(n)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    write_jsonl(d / "pairs.jsonl", _pairs())
    # every pair identical: an evaluation set that keeps nothing
    write_jsonl(d / "same.jsonl", [{"prompt": "hi", "chosen": "yes", "rejected": "yes"}] * 3)
    (d / "columns.json").write_text(json.dumps({"prompt": ["a", "b"], "chosen": ["x", "y"], "rejected": ["u", "v"]}))
    write_jsonl(d / "raw.jsonl", [{"prompt": "two plus two", "chosen": " four", "rejected": " five",
                                   "topic": "sums"}] * 4)
    # 'the cat is blue' / 'the cat is red': the same first tokens, different ends
    write_jsonl(d / "cats.jsonl", [{"prompt": conv(("user", "hello")), "chosen": conv(("assistant", "the cat is blue")),
                                    "rejected": conv(("assistant", "the cat is red"))}] * 2)
    (d / "dup.yaml").write_text("beta: 0.1\nmax_steps: 1\nbeta: 0.2\n")
    build_tokenizer(d / "big_tokenizer", vocab_size=500)  # the tiny model's embedding has 400 rows
    return d


@pytest.fixture(scope="module")
def earlier_run(tiny_model_dir, data_dir):
    """A finished one-step DPO run and the bytes of every file it left."""
    out = data_dir / "earlier"
    assert run_cli("dpo", tiny_model_dir, data_dir / "pairs.jsonl", out, "--max_steps", 1) == 0
    return out, {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def _fails(capsys, *argv) -> str:
    """Run the CLI; it must exit 2 with exactly one line on stderr, which is returned."""
    from prefalign.cli import main

    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


CASES = {  # id: (extra flags, with {d} for the data directory and {rm} for a reward model; expected message)
    "abbreviated flag": (["--learning_rat", "1e-3"], "prefalign dpo: error: unrecognized arguments: --learning_rat 1e-3"),
    "lr nan": (["--learning_rate", "nan"], "--learning_rate: expected a finite number, got 'nan'"),
    "lr inf": (["--learning_rate", "inf"], "--learning_rate: expected a finite number, got 'inf'"),
    "warmup ratio 2": (["--warmup_ratio", "2"], "--warmup_ratio: must be between 0 and 1"),
    "eval_steps 0": (["--eval_steps", "0"], "--eval_steps: must be at least 1"),
    "lora_r 0": (["--use_peft", "--lora_r", "0"], "--lora_r: must be at least 1, got 0"),
    "lora targets": (["--use_peft", "--lora_target_modules", "foo", "bar"],
                     "--lora_target_modules: Qwen2ForCausalLM has no module named 'foo', 'bar'; its linear layers "
                     "are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    "duplicate yaml key": (["--config", "{d}/dup.yaml"], "dup.yaml:3: invalid YAML (duplicate key 'beta' (first on "
                                                         "line 1))"),
    "reward model as policy": (["--model_name_or_path", "{rm}"], "is a Qwen2ForSequenceClassification checkpoint "
                               "(a reward/classification model); a policy must be a causal language model"),
    "tokenizer larger than embedding": (["--tokenizer_name_or_path", "{d}/big_tokenizer"],
                                        "--tokenizer_name_or_path: the tokenizer has 475 tokens but the model's "
                                        "embedding has 400 rows"),
    "eval set all dropped": (["--eval_dataset_name", "{d}/same.jsonl"],
                             "evaluation set {d}/same.jsonl: all 3 pairs dropped: chosen and rejected are identical: 3"),
    "column-oriented json": (["--dataset_name", "{d}/columns.json"],
                             "{d}/columns.json: column-oriented JSON (one object of 3 columns holding 2 values each)"),
    "unknown placeholder": (["--dataset_name", "{d}/raw.jsonl", "--prompt_template", "Q ({{question}}): {{prompt}}"],
                            "--prompt_template: placeholder {{question}} is not a column of {d}/raw.jsonl:1 (text "
                            "columns: chosen, prompt, rejected, topic)"),
    "identical after truncation": (["--dataset_name", "{d}/cats.jsonl", "--max_completion_length", "2"],
                                   "training set {d}/cats.jsonl: all 2 pairs dropped: chosen and rejected identical "
                                   "after truncation: 2; raise --max_length / --max_completion_length"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_line_and_the_earlier_run_is_untouched(case, tiny_model_dir, tiny_reward_model_dir, data_dir,
                                                   earlier_run, capsys):
    out, before = earlier_run
    extra, message = CASES[case]
    fill = {"d": data_dir, "rm": tiny_reward_model_dir}
    line = _fails(capsys, "dpo", "--model_name_or_path", tiny_model_dir, "--dataset_name", data_dir / "pairs.jsonl",
                  "--output_dir", out, "--overwrite_output_dir", "--max_steps", 1, "--disable_tqdm",
                  *[e.format(**fill) for e in extra])
    assert line.startswith("prefalign dpo: error: ") and message.format(**fill) in line, line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_pairs_identical_after_truncation_are_dropped_and_counted(tiny_model_dir, tmp_path, capsys):
    """'the cat is blue' / 'the cat is red' share their first tokens: cut to 2 they no longer differ and would
    train on a loss of ln 2 with margin 0; the other pairs differ in their first token and are kept."""
    rows = _pairs(4) + [{"prompt": conv(("user", "hello")), "chosen": conv(("assistant", "the cat is blue")),
                         "rejected": conv(("assistant", "the cat is red"))}]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "run"
    assert run_cli("dpo", tiny_model_dir, data, out, "--max_steps", 1, "--max_completion_length", 2) == 0
    printed = capsys.readouterr().out
    assert ("train: 4 of 5 pairs kept (prompt truncated 0, completion truncated 4, dropped 1 (chosen and "
            "rejected identical after truncation: 1))") in printed
    first = read_metrics(out / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_blank_prompts_and_a_literal_backslash_n_are_warned_about(tiny_model_dir, tmp_path, caplog):
    rows = [{"prompt": "  ", "chosen": " four", "rejected": " five"},
            {"prompt": "two plus two", "chosen": " four", "rejected": " five"}]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="prefalign.data"):
        assert run_cli("dpo", tiny_model_dir, data, tmp_path / "run", "--max_steps", 1,
                       "--prompt_template", "Question: {prompt}\\nAnswer:") == 0
    text = caplog.text
    assert "--prompt_template contains a literal backslash-n (\\n), not a newline" in text
    assert f"{data}: 1 of 2 rows have an empty or whitespace-only 'prompt' column (first: {data}:1)" in text
