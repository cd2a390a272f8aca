"""`inspect_dataset`: whole-file summary numbers and one row's rendering, derived by hand from the tiny tokenizer.

Token counts used below (read off the tokenizer, see test_tokenize.py):
  B row  prompt "...capital of france" + generation prompt = 19, chosen "paris<|im_end|>\\n" = 4, rejected "red..." = 3
  E rows prompt "hello" = 'he' 'llo' = 2, "four" + EOS = 3, "hello<|im_end|>" = 3, "hi" + EOS = 'h' 'i' EOS = 3
"""

from __future__ import annotations

import copy
import json

import pytest

from helpers import conv
from prefalign.config import DataArgs
from prefalign.data.inspect import _percentiles, inspect_dataset
from prefalign.errors import PrefalignError

QUESTION = conv(("user", "what is the capital of france"))
ROWS = [
    {"prompt": QUESTION, "chosen": conv(("assistant", "paris")), "rejected": conv(("assistant", "red"))},
    {"prompt": "hello", "chosen": "four", "rejected": "hello<|im_end|>"},
    {"prompt": "hello", "chosen": "hi", "rejected": "hi"},  # identical: dropped
]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "d.jsonl"
    # a blank line before an invalid row (no rejected): the invalid row is physical line 5
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n" + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    return path


@pytest.fixture
def tok(tiny_tokenizer):
    return copy.deepcopy(tiny_tokenizer)


def test_summary_numbers(data, tok):
    out = inspect_dataset(DataArgs(dataset_name=str(data), max_length=12), tok, row=0, color=False)
    lines = out.splitlines()
    assert lines[0] == f"== {data}: 4 rows, 3 valid, 1 invalid =="
    # prompt is a list in one row and a string in others, so datasets stores rows as JSON: an absent key stays absent
    assert lines[1] == f"first invalid row: {data}:5: missing column 'rejected' (columns present: chosen, prompt)"
    assert lines[2] == "formats: B prompt messages + assistant answers (TRL): 1, E plain strings: 2"
    # each row of the table: its label (which may hold spaces) in the first 26 columns, then four numbers
    table = {line[:26].strip(): line[26:].split() for line in lines if line.startswith("  ")}
    # nearest-rank percentiles of 3 values: p50 is the 2nd smallest, p90/p99/max the largest
    assert table == {"prompt": ["2", "19", "19", "19"], "chosen": ["3", "4", "4", "4"],
                     "rejected": ["3", "3", "3", "3"], "prompt + longer answer": ["5", "23", "23", "23"]}
    # max_length 12: the B row keeps 12 - 4 = 8 prompt tokens; the E rows (5 tokens) fit
    assert ("truncation (max_length=12, max_prompt_length=None, max_completion_length=None, keep_end): "
            "prompt cut in 1, completion cut in 0 of 2 kept pairs") in lines
    assert "dropped: 1 (chosen and rejected are identical: 1)" in lines


def test_row_detail_marks_scored_tokens(data, tok):
    out = inspect_dataset(DataArgs(dataset_name=str(data), max_length=12), tok, row=0, color=False)
    detail = out[out.index("== row 0"):]
    assert detail.splitlines()[:3] == [
        f"== row 0: {data}:1 (format B: prompt messages + assistant answers (TRL)) ==",
        "tokens: prompt 8, chosen 4, rejected 3; longest sequence 12 (max_length 12)",
        "truncated: prompt 19 -> 8 tokens, cut at the start",
    ]
    # the kept prompt is its last 8 tokens; the scored part is exactly the answer, <|im_end|> and "\n"
    assert " of france<|im_end|>\n<|im_start|>assistant\n[[paris<|im_end|>\n]]\n" in detail
    assert "\n[[red<|im_end|>\n]]\n" in detail
    assert "prompt:   362: of 382: france 2:<|im_end|> 201:\\n 1:<|im_start|> 296:as 307:sistant 201:\\n\n" in detail
    assert "chosen:   [[82:p 325:aris 2:<|im_end|> 201:\\n]]" in detail
    assert "rejected: [[370:red 2:<|im_end|> 201:\\n]]" in detail


def test_raw_row_in_color(data, tok):
    out = inspect_dataset(DataArgs(dataset_name=str(data)), tok, row=1, color=True)
    detail = out[out.index("== row 1"):]
    assert "raw text: no chat template, no BOS (the tokenizer adds none), EOS appended" in detail
    assert "\x1b[2mhello\x1b[0m\x1b[42;30mfour<|im_end|>\x1b[0m" in detail
    assert "[[" not in detail


def test_dropped_and_invalid_rows(data, tok):
    dropped = inspect_dataset(DataArgs(dataset_name=str(data)), tok, row=2, color=False)
    assert "DROPPED: chosen and rejected are identical" in dropped
    invalid = inspect_dataset(DataArgs(dataset_name=str(data)), tok, row=3, color=False)
    assert invalid.endswith(f"== row 3: invalid ==\n{data}:5: missing column 'rejected' (columns present: chosen, prompt)")
    with pytest.raises(PrefalignError) as e:
        inspect_dataset(DataArgs(dataset_name=str(data)), tok, row=4)
    assert e.value.where == "--row" and "the data has 4 rows" in e.value.reason


def test_warnings_for_length_bias_and_cut_completions(tmp_path, tok):
    rows = [{"prompt": "hello", "chosen": "the sky is blue", "rejected": "no"} for _ in range(10)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = inspect_dataset(DataArgs(dataset_name=str(path), max_length=5), tok, color=False)
    assert "warning: chosen is longer than rejected in 10 of 10 pairs" in out
    assert "warning: 10 of 10 pairs lose the end of a completion" in out


def test_named_template_is_applied_and_reported(data, tok):
    out = inspect_dataset(DataArgs(dataset_name=str(data), chat_template="phi3"), tok, row=0, color=False)
    assert "chat template: phi3" in out and "<|user|>\nwhat is the capital of france<|end|>\n<|assistant|>\n[[" in out


def test_percentiles():
    assert _percentiles(list(range(1, 101))) == [50, 90, 99, 100]
    assert _percentiles([7]) == [7, 7, 7, 7]


def test_unpaired_feedback_report(tmp_path, tok):
    """Unpaired rows and a preference pair in one file: examples, labels, TRL's balance warning, one row's examples.
    Raw rows: "hello" = 'he' 'llo' = 2 prompt tokens, " no" + EOS and " yes" + EOS = 2 completion tokens each."""
    from prefalign.config import InspectConfig

    rows = [{"prompt": "hello", "completion": " no", "label": "down"},
            {"prompt": "hello", "completion": " yes", "label": "up"},
            {"prompt": "hello", "completion": " yes", "label": True},
            {"prompt": "hello", "chosen": " yes", "rejected": " no"},
            {"prompt": "hello", "completion": " yes", "label": "perhaps"}]
    path = tmp_path / "fb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = inspect_dataset(InspectConfig(dataset_name=str(path)), tok, row=3, color=False)
    lines = out.splitlines()
    assert lines[0] == f"== {path}: 5 rows, 4 valid, 1 invalid =="
    assert "must be true/false" in lines[1] and f"{path}:5" in lines[1]
    assert lines[2] == ("unpaired feedback: 3 rows, preference pairs: 1 (2 examples each) -> 5 examples, "
                        "3 desirable, 2 undesirable")
    table = [line.split()[-4:] for line in lines if line.startswith("  ")]
    assert table == [["2"] * 4, ["2"] * 4, ["4"] * 4]  # prompt, completion, prompt + completion
    # TRL's ranges for 3:2 at weights 1: desirable [2/3, 1.33·2/3], undesirable [3/2/1.33, 3/2]
    assert any(line.startswith("warning: 3 desirable and 2 undesirable examples") and "[0.67, 0.89]" in line
               and "[1.13, 1.5]" in line for line in lines)
    # row 3 is the pair: shown as its two examples, chosen desirable, rejected undesirable
    assert out.count(f"== row 3: {path}:4 (desirable") == 1 and out.count(f"== row 3: {path}:4 (undesirable") == 1
    assert "hello[[ yes<|im_end|>]]" in out and "hello[[ no<|im_end|>]]" in out


def test_warnings_for_a_literal_backslash_n_and_blank_prompts(tmp_path, tok):
    rows = [{"prompt": " ", "chosen": "yes", "rejected": "no"}, {"prompt": "hello", "chosen": "yes", "rejected": "no"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = inspect_dataset(DataArgs(dataset_name=str(path), prompt_template="Q: {prompt}\\nA:"), tok, color=False)
    lines = out.splitlines()
    assert lines[1].startswith("warning: --prompt_template contains a literal backslash-n (\\n), not a newline; in a "
                               "shell write $'Question: {prompt}\\n\\nAnswer: '")
    assert lines[2] == f"warning: 1 of 2 rows have an empty or whitespace-only 'prompt' column (first: {path}:1)"
    clean = inspect_dataset(DataArgs(dataset_name=str(path), prompt_template="Q: {prompt}\nA:"), tok, color=False)
    assert "backslash-n" not in clean


def test_data_inspect_cli_entry(tiny_model_dir, tmp_path, capsys):
    """`prefalign data inspect` is a two-word command: the CLI finds it, prints the report, and exits 0."""
    from prefalign.cli import main

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    assert main(["data", "inspect", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(path),
                 "--row", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"== {path}: 2 rows, 2 valid, 0 invalid ==\n")
    assert f"== row 1: {path}:2 (format E: plain strings; raw text: no chat template, no BOS (the tokenizer adds none), EOS appended) ==" in out
    assert "[[four<|im_end|>]]" in out  # not a terminal: scored tokens in brackets, the EOS appended to raw text
    assert main(["data", "inspect", "--dataset_name", str(path)]) == 2
    assert capsys.readouterr().err.strip() == ("prefalign data inspect: error: --model_name_or_path: is required (the "
                                               "tokenizer to render with)")
