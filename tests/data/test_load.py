"""Loading rows from files, directories and hub-style datasets, with sources and errors naming file:line."""

from __future__ import annotations

import json
import logging

import pytest

from helpers import conv, write_jsonl
from prefalign.config import DataArgs
from prefalign.data.load import _load_hub, load_pairs, load_rows, split_holdout
from prefalign.data.types import Pair
from prefalign.errors import PrefalignError

ROWS = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(10)]


def test_jsonl_sources_count_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n   \n" + json.dumps(ROWS[2]) + "\n")
    rows = load_rows(str(path))
    assert [r for r, _ in rows] == ROWS[:3]
    assert [s for _, s in rows] == [f"{path}:1", f"{path}:3", f"{path}:5"]


def test_json_array_csv_parquet(tmp_path):
    import datasets

    (tmp_path / "a.json").write_text(json.dumps(ROWS[:2]))
    rows = load_rows(str(tmp_path / "a.json"))
    assert rows == [(ROWS[0], f"{tmp_path / 'a.json'}:row 0"), (ROWS[1], f"{tmp_path / 'a.json'}:row 1")]

    (tmp_path / "c.csv").write_text("prompt,chosen,rejected\nq0,good 0,bad 0\nq1,good 1,bad 1\n")
    rows = load_rows(str(tmp_path / "c.csv"))
    assert rows == [(ROWS[0], f"{tmp_path / 'c.csv'}:2"), (ROWS[1], f"{tmp_path / 'c.csv'}:3")]  # line 1: header

    datasets.Dataset.from_list(ROWS[:3]).to_parquet(str(tmp_path / "p.parquet"))
    rows = load_rows(str(tmp_path / "p.parquet"))
    assert [r for r, _ in rows] == ROWS[:3] and rows[2][1] == f"{tmp_path / 'p.parquet'}:row 2"


def test_directory_picks_files_named_after_the_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS[:3])
    write_jsonl(tmp_path / "test.jsonl", ROWS[3:4])
    assert [r for r, _ in load_rows(str(tmp_path), split="train")] == ROWS[:3]
    assert load_rows(str(tmp_path), split="test") == [(ROWS[3], f"{tmp_path / 'test.jsonl'}:1")]
    with pytest.raises(PrefalignError, match="no file named after split 'validation'"):
        load_rows(str(tmp_path), split="validation")


def test_directory_without_split_names_is_all_train(tmp_path):
    write_jsonl(tmp_path / "part1.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "part2.jsonl", ROWS[2:3])
    rows = load_rows(str(tmp_path))
    assert [s for _, s in rows] == [f"{tmp_path / 'part1.jsonl'}:1", f"{tmp_path / 'part1.jsonl'}:2",
                                    f"{tmp_path / 'part2.jsonl'}:1"]


def test_hub_path_through_datasets_with_a_local_directory(tmp_path):
    """The hub branch is plain `datasets.load_dataset(name, config, split)`: a local dataset directory works
    the same way offline, so its source naming and split handling are tested with one."""
    write_jsonl(tmp_path / "train.jsonl", ROWS[:2])
    rows = _load_hub(str(tmp_path), None, "train")
    assert rows == [(ROWS[0], f"{tmp_path}[train]:row 0"), (ROWS[1], f"{tmp_path}[train]:row 1")]
    with pytest.raises(PrefalignError) as e:
        _load_hub(str(tmp_path), None, "nosuchsplit")
    assert e.value.where == str(tmp_path) and "cannot load dataset" in e.value.reason


def test_unknown_hub_id_offline_is_one_line():
    with pytest.raises(PrefalignError) as e:
        load_rows("prefalign-test/no-such-dataset-xyz")
    assert e.value.where == "prefalign-test/no-such-dataset-xyz" and "\n" not in str(e.value)


def test_malformed_json_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"prompt": "q", "chosen": \n' + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(PrefalignError) as e:
        load_rows(str(path))
    assert e.value.where == f"{path}:3" and e.value.reason.startswith("invalid JSON")


def test_undecodable_bytes_are_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(PrefalignError) as e:
        load_rows(str(path))
    assert e.value.where == f"{path}:2" and "not UTF-8" in e.value.reason


def test_non_object_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(PrefalignError) as e:
        load_rows(str(path))
    assert e.value.where == f"{path}:2" and "must be a JSON object" in e.value.reason


def test_json_array_syntax_error_names_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n{"prompt": "q"},\n{"prompt": }\n]')
    with pytest.raises(PrefalignError) as e:
        load_rows(str(path))
    assert e.value.where == f"{path}:3"


def test_formats_mixed_in_one_file(tmp_path):
    """A column that is a string in one row and a list in another (E and A mixed) still loads."""
    rows = [ROWS[0], {"chosen": conv(("user", "q"), ("assistant", "a")), "rejected": conv(("user", "q"), ("assistant", "b"))}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    train, _ = load_pairs(DataArgs(dataset_name=str(path)))
    assert train == [Pair("q0", "good 0", "bad 0", f"{path}:1"),
                     Pair(conv(("user", "q")), conv(("assistant", "a")), conv(("assistant", "b")), f"{path}:2")]


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(PrefalignError) as e:
        load_rows(str(path))
    assert (e.value.where, e.value.reason) == (str(path), "empty file")


def test_missing_paths(tmp_path):
    for name in [str(tmp_path / "nope.jsonl"), "./nope", str(tmp_path / "nope" / "dir")]:
        with pytest.raises(PrefalignError) as e:
            load_rows(name)
        assert (e.value.where, e.value.reason) == (name, "no such file or directory")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrefalignError, match="no .jsonl/.json/.parquet/.csv files"):
        load_rows(str(tmp_path / "empty"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(PrefalignError, match="unsupported file type '.txt'"):
        load_rows(str(tmp_path / "x.txt"))


def test_load_pairs_stops_at_first_bad_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"prompt": "q", "chosen": "a"}, {"prompt": "q"}])
    with pytest.raises(PrefalignError) as e:
        load_pairs(DataArgs(dataset_name=str(path)))
    assert e.value.where == f"{path}:2"
    assert e.value.reason == "column 'rejected' is empty (null)"  # Arrow filled the absent key with null


def test_missing_column_names_present_ones(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(PrefalignError) as e:
        load_pairs(DataArgs(dataset_name=str(path)))
    assert str(e.value) == f"{path}:1: missing column 'chosen' (columns present: answer, question)"


def test_skip_invalid_rows_reports_one_line(tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"prompt": "q", "chosen": "a"}, ROWS[1], {"prompt": "q"}])
    with caplog.at_level(logging.WARNING, logger="prefalign.data"):
        train, evals = load_pairs(DataArgs(dataset_name=str(path), skip_invalid_rows=True))
    assert [p.source for p in train] == [f"{path}:1", f"{path}:3"] and evals is None
    (record,) = caplog.records
    assert record.getMessage() == (f"{path}: skipped 2 invalid rows of 4 (first: {path}:2: column 'rejected' "
                                   "is empty (null))")


def test_all_rows_invalid_is_an_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(PrefalignError, match="all 1 rows are invalid"):
        load_pairs(DataArgs(dataset_name=str(path), skip_invalid_rows=True))


def test_eval_split_ratio_is_seeded_and_deterministic(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    args = DataArgs(dataset_name=str(path), eval_split_ratio=0.3)
    train, evals = load_pairs(args)
    assert (len(train), len(evals)) == (7, 3)  # round(0.3 * 10) held out
    assert load_pairs(args) == (train, evals)  # same seed, same split
    assert sorted(p.source for p in train + evals) == sorted(f"{path}:{i}" for i in range(1, 11))
    pairs = [Pair("p", "a", str(i)) for i in range(10)]
    assert split_holdout(pairs, 0.3, seed=1) != split_holdout(pairs, 0.3, seed=2)
    with pytest.raises(PrefalignError) as e:
        split_holdout(pairs, 1.5, seed=0)
    assert e.value.where == "--eval_split_ratio"


def test_eval_dataset_and_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS[:4])
    write_jsonl(tmp_path / "test.jsonl", ROWS[4:6])
    train, evals = load_pairs(DataArgs(dataset_name=str(tmp_path), eval_dataset_name=str(tmp_path)))
    assert [p.prompt for p in train] == ["q0", "q1", "q2", "q3"]
    assert [p.prompt for p in evals] == ["q4", "q5"]


def test_no_dataset_names_the_flag():
    with pytest.raises(PrefalignError) as e:
        load_pairs(DataArgs())
    assert e.value.where == "--dataset_name"


def test_column_oriented_json_is_recognised(tmp_path):
    """pandas' to_json(orient="list") layout loads as one row of lists; it is named as such, compact or
    pretty-printed, conversational columns included, while a real single conversational row still loads."""
    columns = {"prompt": [conv(("user", "a")), conv(("user", "b"))], "chosen": ["x", "y"], "rejected": ["u", "v"]}
    for name, text in (("c.json", json.dumps(columns)), ("p.json", json.dumps(columns, indent=2)),
                       ("l.jsonl", json.dumps(columns) + "\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(PrefalignError) as e:
            load_rows(str(tmp_path / name))
        assert str(e.value) == (f"{tmp_path / name}: column-oriented JSON (one object of 3 columns holding 2 values "
                                "each); write one object per row instead: JSON Lines, or a JSON array of objects")
    one = {"prompt": conv(("user", "hi")), "chosen": conv(("assistant", "a")), "rejected": conv(("assistant", "b"))}
    (tmp_path / "one.json").write_text(json.dumps(one))
    assert [r for r, _ in load_rows(str(tmp_path / "one.json"))] == [one]


def test_blank_prompts_are_counted_in_one_warning(tmp_path, caplog):
    rows = [{"prompt": " \t", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "b"},
            {"prompt": conv(("user", "  ")), "chosen": conv(("assistant", "a")), "rejected": conv(("assistant", "b"))}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="prefalign.data"):
        train, _ = load_pairs(DataArgs(dataset_name=str(path)))
    assert len(train) == 3  # kept: a row may have no context
    assert (f"{path}: 2 of 3 rows have an empty or whitespace-only 'prompt' column (first: {path}:1)"
            in caplog.text)
