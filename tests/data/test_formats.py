"""Format detection, validation and normalisation of preference rows (formats A-F, system prompts)."""

from __future__ import annotations

import pytest

from helpers import conv
from prefalign.config import DataArgs
from prefalign.data.formats import detect_format, normalize_pair
from prefalign.data.types import Pair
from prefalign.errors import PrefalignError

SYSTEM = ("system", "be brief")
HISTORY = conv(SYSTEM, ("user", "hello"), ("assistant", "hi"), ("user", "what is the capital of france"))
CHOSEN, REJECTED = conv(("assistant", "paris")), conv(("assistant", "red"))


def rows_a_to_d() -> dict[str, dict]:
    """One multi-turn pair with a system message, written in each conversational format."""
    full_c, full_r = HISTORY + CHOSEN, HISTORY + REJECTED
    return {
        "A": {"chosen": full_c, "rejected": full_r},
        "B": {"prompt": HISTORY, "chosen": CHOSEN, "rejected": REJECTED},
        # hh-rlhf style: the string prompt is only the first user turn and must not be used
        "C": {"prompt": "hello", "chosen": full_c, "rejected": full_r},
        "D": {"prompt": "what is the capital of france", "prompt_id": "abc", "chosen": full_c, "rejected": full_r,
              "messages": full_c, "score_chosen": 8.0, "score_rejected": 3.5, "source": "sharegpt"},
    }


def test_a_b_c_d_give_equal_pairs():
    args = DataArgs()
    pairs = {k: normalize_pair(row, "f.jsonl:1", args) for k, row in rows_a_to_d().items()}
    expected = Pair(HISTORY, CHOSEN, REJECTED, "f.jsonl:1")
    for k, pair in pairs.items():
        assert pair == expected, k
        assert pair.is_conversational
    assert {k: detect_format(row, args) for k, row in rows_a_to_d().items()} == {"A": "A", "B": "B", "C": "C", "D": "D"}
    # D's scalar columns travel in extra (not compared), the message list does not
    assert pairs["D"].extra == {"prompt_id": "abc", "score_chosen": 8.0, "score_rejected": 3.5, "source": "sharegpt"}


def test_e_equals_f_with_column_mapping_and_template():
    template = "Question: {prompt}\n\nAnswer: "
    e_row = {"prompt": "Question: two plus two\n\nAnswer: ", "chosen": "four", "rejected": "five"}
    # lvwerra/stack-exchange-paired as it is: question, response_j (preferred), response_k
    f_row = {"qid": 7, "question": "two plus two", "date": "2020", "response_j": "four", "response_k": "five"}
    f_args = DataArgs(prompt_column="question", chosen_column="response_j", rejected_column="response_k",
                      prompt_template=template)
    e, f = normalize_pair(e_row, "x:1", DataArgs()), normalize_pair(f_row, "x:1", f_args)
    assert e == f == Pair("Question: two plus two\n\nAnswer: ", "four", "five", "x:1")
    assert not e.is_conversational
    assert (detect_format(e_row, DataArgs()), detect_format(f_row, f_args)) == ("E", "F")
    assert f.extra == {"qid": 7, "date": "2020"}


def test_prompt_template_keeps_other_braces_and_must_name_prompt():
    args = DataArgs(prompt_template='{"q": "{prompt}"} ->')
    assert normalize_pair({"prompt": "hi", "chosen": "a", "rejected": "b"}, "x:1", args).prompt == '{"q": "hi"} ->'
    with pytest.raises(PrefalignError) as e:
        normalize_pair({"prompt": "hi", "chosen": "a", "rejected": "b"}, "x:1", DataArgs(prompt_template="Q:"))
    assert e.value.where == "--prompt_template"


def test_prompt_template_fills_other_placeholders_from_columns():
    """{question} comes from the row's column of that name; the prompt's own text is not substituted again; a
    placeholder naming no text column is a one-line error that names it, the row and the columns there are."""
    row = {"prompt": "say {topic}", "topic": "sums", "id": 3, "chosen": "a", "rejected": "b", "tags": ["x"]}
    args = DataArgs(prompt_template="[{topic} #{id}] {prompt}")
    assert normalize_pair(row, "x:1", args).prompt == "[sums #3] say {topic}"
    for template, what in (("{missing} {prompt}", "is not a column"), ("{tags} {prompt}", "is not a text column")):
        with pytest.raises(PrefalignError) as e:
            normalize_pair(row, "x:1", DataArgs(prompt_template=template))
        name = template.split()[0]
        assert str(e.value) == (f"--prompt_template: placeholder {name} {what} of x:1 (text columns: chosen, id, "
                                "prompt, rejected, topic)")


def test_prompt_template_placeholders_in_sft_and_rl_prompts():
    from prefalign.data.prompts import normalize_prompt_row
    from prefalign.data.sft import normalize_sft_row

    args = DataArgs(prompt_template="({level}) {prompt}")
    row = {"prompt": "2+2?", "level": "easy", "completion": "4"}
    assert normalize_prompt_row(row, "x:1", args).prompt == "(easy) 2+2?"
    assert normalize_sft_row(row, "x:1", args).prompt == "(easy) 2+2?"
    with pytest.raises(PrefalignError, match=r"placeholder \{level\} is not a column of x:2"):
        normalize_prompt_row({"prompt": "2+2?"}, "x:2", args)


def test_system_prompt_added_only_where_missing():
    args = DataArgs(system_prompt="you are helpful")
    no_system = normalize_pair({"prompt": conv(("user", "hi")), "chosen": CHOSEN, "rejected": REJECTED}, "x:1", args)
    assert no_system.prompt == conv(("system", "you are helpful"), ("user", "hi"))
    has_system = normalize_pair(rows_a_to_d()["A"], "x:1", args)
    assert has_system.prompt == HISTORY  # its own "be brief" system message is kept, none added


def test_string_prompt_with_assistant_only_answers_is_one_user_turn():
    pair = normalize_pair({"prompt": "hi", "chosen": CHOSEN, "rejected": REJECTED}, "x:1", DataArgs())
    assert pair.prompt == conv(("user", "hi"))
    # and bare-string answers to a message-list prompt become assistant turns
    pair = normalize_pair({"prompt": conv(("user", "hi")), "chosen": "paris", "rejected": "red"}, "x:1", DataArgs())
    assert (pair.chosen, pair.rejected) == (CHOSEN, REJECTED)


def test_margin_and_arrow_null_keys():
    row = {"prompt": [{"role": "user", "content": "hi", "name": None}],
           "chosen": [{"role": "assistant", "content": "paris", "name": None}], "rejected": REJECTED, "margin": 2}
    pair = normalize_pair(row, "x:1", DataArgs())
    assert pair.margin == 2.0 and isinstance(pair.margin, float)
    assert pair.prompt == conv(("user", "hi")) and pair.chosen == CHOSEN  # None-valued keys dropped


def test_identical_chosen_and_rejected_is_not_an_error_here():
    pair = normalize_pair({"prompt": "p", "chosen": "same", "rejected": "same"}, "x:1", DataArgs())
    assert pair.chosen == pair.rejected == "same"


def _error(row: dict, args: DataArgs | None = None) -> PrefalignError:
    with pytest.raises(PrefalignError) as e:
        normalize_pair(row, "data.jsonl:7", args or DataArgs())
    assert e.value.where == "data.jsonl:7"
    assert "\n" not in str(e.value)
    return e.value


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "p", "chosen": "a"}, "missing column 'rejected' (columns present: chosen, prompt)"),
        ({"chosen": "a", "rejected": "b"}, "missing column 'prompt' (columns present: chosen, rejected)"),
        ({"prompt": "p", "chosen": None, "rejected": "b"}, "column 'chosen' is empty (null)"),
        ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "column 'chosen' is an empty string"),
        ({"prompt": "p", "chosen": 3, "rejected": 4}, "column 'chosen' must be a string or a list of messages"),
        ({"prompt": "p", "chosen": "a", "rejected": CHOSEN}, "'chosen' is a str but 'rejected' is a list"),
        ({"prompt": 5, "chosen": "a", "rejected": "b"}, "column 'prompt' must be a string, got a int"),
        ({"chosen": ["hi", CHOSEN[0]], "rejected": REJECTED}, "'chosen' message 0 must be an object"),
        ({"chosen": [{"content": "x"}], "rejected": REJECTED}, "'chosen' message 0 has no 'role'"),
        ({"chosen": CHOSEN, "rejected": [{"role": "assistant"}]}, "'rejected' message 0 has no 'content'"),
        ({"chosen": conv(("human", "x"), ("assistant", "y")), "rejected": REJECTED},
         "'chosen' message 0 has unknown role 'human' (allowed: system, user, assistant, tool)"),
        ({"chosen": [{"role": "assistant", "content": ["a"]}], "rejected": REJECTED},
         "'chosen' message 0 part 0 must be an object with a 'type', got str"),
        ({"chosen": conv(("user", "x")), "rejected": conv(("user", "x"))},
         "the final turn of 'chosen' is from 'user', not the assistant"),
        ({"chosen": conv(("user", "x"), ("assistant", " ")), "rejected": conv(("user", "x"), ("assistant", "y"))},
         "the final assistant turn of 'chosen' is empty"),
        ({"chosen": conv(("user", "x"), ("assistant", "a")), "rejected": conv(("user", "z"), ("assistant", "b"))},
         "conversations differ at message 0 (user vs user); they may differ only in the final assistant turn"),
        ({"chosen": HISTORY + CHOSEN, "rejected": conv(("user", "x"), ("assistant", "b"))},
         "conversations differ at message 0 (system vs user)"),
        ({"chosen": [], "rejected": REJECTED}, "column 'chosen' is an empty list of messages"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "column 'margin' must be a finite number"),
    ],
)
def test_validation_errors(row, message):
    assert message in _error(row).reason


def test_missing_mapped_column_names_the_mapping():
    args = DataArgs(prompt_column="question", chosen_column="response_j", rejected_column="response_k")
    err = _error({"question": "q", "response_j": "a"}, args)
    assert err.reason == "missing column 'response_k' (columns present: question, response_j)"
