"""Unpaired feedback rows: formats, labels, TRL's unpairing order, tokenization with exact tokens, balance advice."""

from __future__ import annotations

import pytest

from helpers import conv, write_jsonl
from prefalign.config import KTOConfig
from prefalign.data.tokenize import Truncation
from prefalign.data.types import UnpairedExample
from prefalign.data.unpaired import (
    balance_advice,
    load_feedback,
    normalize_feedback,
    parse_label,
    tokenize_unpaired,
    unpaired_order,
)
from prefalign.errors import PrefalignError

ARGS = KTOConfig()


def one(row, args=ARGS, source="f.jsonl:3"):
    return normalize_feedback(row, source, args)


@pytest.mark.parametrize(("value", "label"), [(True, True), (False, False), (1, True), (0, False), (-1, False),
                                              (1.0, True), ("up", True), ("Thumbs_Down", False), ("👍", True),
                                              ("bad", False), (" yes ", True), ("-1", False)])
def test_labels(value, label):
    assert parse_label(value, "label", "f:1") is label


@pytest.mark.parametrize("value", ["maybe", 2, 0.5, [True]])
def test_bad_labels_name_the_row_and_the_value(value):
    with pytest.raises(PrefalignError) as e:
        one({"prompt": "q", "completion": "a", "label": value})
    assert e.value.where == "f.jsonl:3" and "column 'label' must be true/false" in str(e.value)


def test_standard_and_conversational_rows():
    assert one({"prompt": "what is", "completion": " blue", "label": True}) == [
        UnpairedExample("what is", " blue", True, "f.jsonl:3")]
    q, a = conv(("user", "hi")), conv(("assistant", "hello"))
    assert one({"prompt": q, "completion": a, "label": False}) == [UnpairedExample(q, a, False, "f.jsonl:3")]
    # a string prompt with message answers is one user turn; a bare string answer to messages an assistant turn
    assert one({"prompt": "hi", "completion": a, "label": True})[0].prompt == q
    assert one({"prompt": q, "completion": "hello", "label": True})[0].completion == a
    # a whole conversation as the completion: its history is the prompt (a string prompt column is not used)
    whole = conv(("user", "hi"), ("assistant", "hello"))
    assert one({"prompt": "ignored", "completion": whole, "label": True})[0] == UnpairedExample(q, a, True,
                                                                                                 "f.jsonl:3")
    system = KTOConfig(system_prompt="be brief")
    assert one({"prompt": q, "completion": a, "label": True}, system)[0].prompt[0] == {"role": "system",
                                                                                        "content": "be brief"}


def test_pairs_are_unpaired_and_thumbs_columns_are_mapped():
    row = {"prompt": conv(("user", "2+2")), "chosen": conv(("assistant", "4")), "rejected": conv(("assistant", "5"))}
    chosen, rejected = one(row)
    assert (chosen.label, rejected.label) == (True, False)
    assert chosen.prompt == rejected.prompt == conv(("user", "2+2"))
    assert (chosen.completion, rejected.completion) == (conv(("assistant", "4")), conv(("assistant", "5")))
    mapped = KTOConfig(prompt_column="question", completion_column="answer", label_column="thumbs")
    (ex,) = one({"question": "2+2?", "answer": " 4", "thumbs": "down"}, mapped)
    assert (ex.prompt, ex.completion, ex.label) == ("2+2?", " 4", False)


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "q", "answer": "a"}, "missing column 'label' (columns present: answer, prompt); unpaired rows need "
                                     "'prompt', 'completion' and 'label', preference pairs 'chosen' and 'rejected'"),
    ({"prompt": "q", "label": True}, "missing column 'completion' (columns present: label, prompt)"),
    ({"completion": "a", "label": True}, "column 'prompt' must be a string for a string completion, got missing"),
    ({"prompt": "q", "completion": "  ", "label": True}, "column 'completion' is an empty string"),
    ({"completion": conv(("assistant", "a")), "label": True}, "missing column 'prompt'"),
    ({"prompt": "q", "completion": conv(("assistant", "")), "label": 1}, "non-empty assistant message"),
    ({"prompt": "q", "chosen": "a"}, "missing column 'rejected'"),
])
def test_bad_rows_are_one_line_errors_naming_the_row(row, message):
    with pytest.raises(PrefalignError) as e:
        one(row)
    assert str(e.value).startswith("f.jsonl:3: ") and message in str(e.value) and "\n" not in str(e.value)


def test_trl_unpairing_order_in_blocks_of_1000():
    def pair(k):
        return [UnpairedExample("p", f"c{k}", True), UnpairedExample("p", f"r{k}", False)]

    assert [e.completion for e in unpaired_order([pair(0), pair(1), pair(2)])] == ["c0", "c1", "c2", "r0", "r1", "r2"]
    rows = [pair(k) for k in range(1001)]
    order = [e.completion for e in unpaired_order(rows)]
    assert order[999:1001] == ["c999", "r0"] and order[2000:] == ["c1000", "r1000"]
    mixed = [[UnpairedExample("p", "u0", True)], pair(1), [UnpairedExample("p", "u2", False)]]
    assert [e.completion for e in unpaired_order(mixed)] == ["u0", "c1", "u2", "r1"]


def test_a_held_out_pair_keeps_both_answers_on_one_side(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": f" a{i}", "rejected": f" b{i}"} for i in range(10)]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    train, eval_ = load_feedback(KTOConfig(dataset_name=str(data), eval_split_ratio=0.2))
    assert len(train) == 16 and len(eval_) == 4
    held = {e.prompt for e in eval_}
    assert len(held) == 2 and not held & {e.prompt for e in train}


def test_tokens_of_conversational_and_raw_examples(tiny_tokenizer):
    chat = UnpairedExample(conv(("user", "what is the sky")), conv(("assistant", "blue")), True, "f:1")
    raw = UnpairedExample("what is the sky", " blue", False, "f:2")
    (a, b), stats = tokenize_unpaired([chat, raw], tiny_tokenizer, Truncation(max_length=64))
    decode = tiny_tokenizer.decode
    assert decode(a.prompt_ids) == "<|im_start|>user\nwhat is the sky<|im_end|>\n<|im_start|>assistant\n"
    assert decode(a.completion_ids) == "blue<|im_end|>\n"  # TRL's split: the template's newline is scored too
    assert decode(b.prompt_ids) == "what is the sky" and decode(b.completion_ids) == " blue<|im_end|>"
    assert b.completion_ids[-1] == tiny_tokenizer.eos_token_id and (a.label, b.label) == (True, False)
    assert stats.summary() == ("tokenized 2 examples: kept 2, prompt truncated 0, completion truncated 0, "
                               "dropped 0")


def test_truncation_modes_and_drops(tiny_tokenizer):
    raw = UnpairedExample("what is the sky", " blue", True, "f:1")  # prompt 7 tokens, completion 3
    (keep_end,), _ = tokenize_unpaired([raw], tiny_tokenizer, Truncation(max_length=5))
    assert len(keep_end.prompt_ids) == 2 and len(keep_end.completion_ids) == 3  # the oldest context goes first
    (keep_start,), _ = tokenize_unpaired([raw], tiny_tokenizer, Truncation(max_length=8, keep_end=False))
    assert len(keep_start.prompt_ids) == 7 and len(keep_start.completion_ids) == 1  # TRL's rule: the first tokens
    short = UnpairedExample("hi", " no", True, "f:2")
    kept, stats = tokenize_unpaired([raw, short], tiny_tokenizer, Truncation(max_length=7, keep_end=False))
    assert [e.source for e in kept] == ["f:2"] and stats.dropped["no_completion"] == 1
    with pytest.raises(PrefalignError) as e:
        tokenize_unpaired([raw], tiny_tokenizer, Truncation(max_length=7, keep_end=False))
    assert e.value.where == "--max_length" and "all 1 examples dropped" in str(e.value)


def test_balance_advice_follows_trl():
    # TRL 1.16 with 4 desirable / 2 undesirable and weights 1: "[0.5, 0.67]" / "[1.5, 2.0]"
    advice = balance_advice(4, 2)
    assert "--desirable_weight in [0.5, 0.67] OR --undesirable_weight in [1.5, 2]" in advice
    assert "[0.35, 0.47]" in balance_advice(4, 2, 1.3, 0.7) and "[1.95, 2.6]" in balance_advice(4, 2, 1.3, 0.7)
    assert balance_advice(5, 5) is None  # balanced
    assert balance_advice(4, 3) is None  # 4:3 lies in [1:1, 4:3]
    assert balance_advice(4, 2, desirable_weight=0.6) is None  # a weight in its range
    assert balance_advice(0, 6) is not None and balance_advice(6, 0) is not None


def test_a_mixed_file_reads_each_row_by_its_own_columns(tmp_path):
    """Arrow gives every row every column (None where absent); a None label is no label, a pair row stays a pair."""
    rows = [{"prompt": "q", "completion": " a", "label": "up"}, {"prompt": "q", "chosen": " a", "rejected": " b"},
            {"prompt": "q", "completion": " b", "label": None}]
    data = write_jsonl(tmp_path / "m.jsonl", rows[:2])
    train, _ = load_feedback(KTOConfig(dataset_name=str(data)))
    assert [(e.completion, e.label) for e in train] == [(" a", True), (" a", True), (" b", False)]
    with pytest.raises(PrefalignError, match="column 'label' is empty"):
        one(rows[2])
