"""Tokenization of pairs with exact tokens from the tiny ChatML tokenizer (eos <|im_end|> = id 2).

Expected pieces were read off the tokenizer once by hand and written out here: e.g. "paris<|im_end|>\\n"
encodes as 'p' 'aris' '<|im_end|>' '\\n'. A piece list is an exact token assertion: each piece is one id.
"""

from __future__ import annotations

import copy
import logging

import pytest

from helpers import conv
from prefalign.config import DataArgs
from prefalign.data.formats import normalize_pair
from prefalign.data.tokenize import Truncation, split_names, tokenize_pairs
from prefalign.data.types import Pair
from prefalign.errors import PrefalignError

IM_START, IM_END = 1, 2
QUESTION = conv(("user", "what is the capital of france"))
# '<|im_start|>user\nwhat is the capital of france<|im_end|>\n<|im_start|>assistant\n'
PROMPT_PIECES = ["<|im_start|>", "user", "\n", "w", "h", "at", " ", "is", " the", " c", "apital", " of", " france",
                 "<|im_end|>", "\n", "<|im_start|>", "as", "sistant", "\n"]
# TRL's rule: everything the template writes after the generation prompt is scored -- the answer, the
# end-of-turn token (so the model learns to stop) and the newline ChatML puts after it.
CHOSEN_PIECES = ["p", "aris", "<|im_end|>", "\n"]
REJECTED_PIECES = ["red", "<|im_end|>", "\n"]


def pieces(tok, ids: list[int]) -> list[str]:
    return [tok.decode([i]) for i in ids]


def chat_pair(prompt=QUESTION, chosen="paris", rejected="red", source="d.jsonl:1") -> Pair:
    return Pair(prompt, conv(("assistant", chosen)), conv(("assistant", rejected)), source)


def tok_pieces(tok, pair: Pair, **kw):
    (tp,), stats = tokenize_pairs([pair], tok, Truncation.of(DataArgs(**kw)))
    return pieces(tok, tp.prompt_ids), pieces(tok, tp.chosen_ids), pieces(tok, tp.rejected_ids), stats


def test_chatml_scores_answer_im_end_and_newline(tiny_tokenizer):
    (tp,), stats = tokenize_pairs([chat_pair()], tiny_tokenizer, Truncation.of(DataArgs()))
    assert pieces(tiny_tokenizer, tp.prompt_ids) == PROMPT_PIECES
    assert pieces(tiny_tokenizer, tp.chosen_ids) == CHOSEN_PIECES
    assert pieces(tiny_tokenizer, tp.rejected_ids) == REJECTED_PIECES
    assert tp.prompt_ids[0] == IM_START and tp.chosen_ids[2] == IM_END and tp.rejected_ids[1] == IM_END
    assert tp.source == "d.jsonl:1" and tp.num_tokens == 19 + 4 + 3
    assert (stats.total, stats.kept, stats.num_dropped) == (1, 1, 0)


def test_multi_turn_history_with_system_is_prompt(tiny_tokenizer):
    history = conv(("system", "be brief"), ("user", "hello"), ("assistant", "hi"), ("user", "what is the capital of france"))
    prompt, chosen, rejected, _ = tok_pieces(tiny_tokenizer, chat_pair(history))
    assert "".join(prompt) == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
                               "<|im_start|>assistant\nhi<|im_end|>\n" + "".join(PROMPT_PIECES))
    # the earlier assistant turn "hi" is context, not scored: only the final answer is
    assert prompt[-19:] == PROMPT_PIECES and (chosen, rejected) == (CHOSEN_PIECES, REJECTED_PIECES)
    assert prompt[:13] == ["<|im_start|>", "s", "ystem", "\n", "b", "e", " b", "r", "i", "e", "f", "<|im_end|>", "\n"]


def test_system_prompt_arg_reaches_the_tokens(tiny_tokenizer):
    args = DataArgs(system_prompt="be brief")
    pair = normalize_pair({"prompt": QUESTION, "chosen": conv(("assistant", "paris")),
                           "rejected": conv(("assistant", "red"))}, "x:1", args)
    (tp,), _ = tokenize_pairs([pair], tiny_tokenizer, Truncation.of(args))
    assert pieces(tiny_tokenizer, tp.prompt_ids) == [
        "<|im_start|>", "s", "ystem", "\n", "b", "e", " b", "r", "i", "e", "f", "<|im_end|>", "\n", *PROMPT_PIECES]


def test_formats_a_b_c_d_tokenize_identically(tiny_tokenizer):
    full_c, full_r = QUESTION + conv(("assistant", "paris")), QUESTION + conv(("assistant", "red"))
    rows = [{"chosen": full_c, "rejected": full_r},
            {"prompt": QUESTION, "chosen": conv(("assistant", "paris")), "rejected": conv(("assistant", "red"))},
            {"prompt": "what is the capital of france", "chosen": full_c, "rejected": full_r},
            {"prompt": "what is the capital of france", "prompt_id": "x", "chosen": full_c, "rejected": full_r,
             "messages": full_c, "score_chosen": 9.0, "score_rejected": 1.0}]
    args = DataArgs()
    tokenized, _ = tokenize_pairs([normalize_pair(r, "x:1", args) for r in rows], tiny_tokenizer, Truncation.of(args))
    assert len(tokenized) == 4 and all(t == tokenized[0] for t in tokenized)
    assert pieces(tiny_tokenizer, tokenized[0].chosen_ids) == CHOSEN_PIECES


def test_raw_text_e_equals_f_and_gets_eos(tiny_tokenizer):
    e_args = DataArgs()
    f_args = DataArgs(prompt_column="question", chosen_column="response_j", rejected_column="response_k",
                      prompt_template="Question: {prompt}\n\nAnswer: ")
    e = normalize_pair({"prompt": "Question: what is two plus two\n\nAnswer: ", "chosen": "four",
                        "rejected": "hello<|im_end|>"}, "x:1", e_args)
    f = normalize_pair({"question": "what is two plus two", "response_j": "four", "response_k": "hello<|im_end|>"},
                       "x:1", f_args)
    (te,), _ = tokenize_pairs([e], tiny_tokenizer, Truncation.of(e_args))
    (tf,), _ = tokenize_pairs([f], tiny_tokenizer, Truncation.of(f_args))
    assert te == tf
    # TRL's rule: prompt and prompt + answer tokenized as the tokenizer does by default (this one adds no BOS; see
    # test_bos_rule.py for one that does); the prompt's trailing space merges into the answer's first token
    assert pieces(tiny_tokenizer, te.prompt_ids) == ["Q", "u", "est", "ion", ":", " what", " ", "is", " two",
                                                     " pl", "us", " two", "\n", "\n", "A", "n", "s", "w", "er", ":"]
    assert pieces(tiny_tokenizer, te.chosen_ids) == [" four", "<|im_end|>"]  # EOS appended
    assert pieces(tiny_tokenizer, te.rejected_ids) == [" hello", "<|im_end|>"]  # already there: not doubled


def test_keep_end_drops_oldest_prompt_tokens(tiny_tokenizer):
    # longest completion 4 tokens, max_length 10 -> the prompt keeps its last 6 tokens
    prompt, chosen, rejected, stats = tok_pieces(tiny_tokenizer, chat_pair(), max_length=10)
    assert prompt == PROMPT_PIECES[-6:] == ["<|im_end|>", "\n", "<|im_start|>", "as", "sistant", "\n"]
    assert (chosen, rejected) == (CHOSEN_PIECES, REJECTED_PIECES)
    assert (stats.prompt_truncated, stats.completion_truncated) == (1, 0)


def test_keep_end_keeps_one_prompt_token_then_cuts_completions(tiny_tokenizer):
    prompt, chosen, rejected, stats = tok_pieces(tiny_tokenizer, chat_pair(), max_length=4)
    assert prompt == ["\n"] and chosen == ["p", "aris", "<|im_end|>"] and rejected == REJECTED_PIECES
    assert (stats.prompt_truncated, stats.completion_truncated) == (1, 1)


def test_keep_start_cuts_completion_ends(tiny_tokenizer):
    # prompt 19 + room 2 = 21
    prompt, chosen, rejected, stats = tok_pieces(tiny_tokenizer, chat_pair(), max_length=21, truncation_mode="keep_start")
    assert prompt == PROMPT_PIECES and chosen == ["p", "aris"] and rejected == ["red", "<|im_end|>"]
    assert (stats.prompt_truncated, stats.completion_truncated) == (0, 1)


@pytest.mark.parametrize(("mode", "expected"), [("keep_end", PROMPT_PIECES[-5:]), ("keep_start", PROMPT_PIECES[:5])])
def test_max_prompt_length_both_modes(tiny_tokenizer, mode, expected):
    prompt, chosen, _, stats = tok_pieces(tiny_tokenizer, chat_pair(), max_prompt_length=5, truncation_mode=mode)
    assert prompt == expected and chosen == CHOSEN_PIECES and stats.prompt_truncated == 1


def test_max_completion_length(tiny_tokenizer):
    _, chosen, rejected, stats = tok_pieces(tiny_tokenizer, chat_pair(), max_completion_length=2)
    assert chosen == ["p", "aris"] and rejected == ["red", "<|im_end|>"] and stats.completion_truncated == 1


def test_drops_and_stats(tiny_tokenizer):
    pairs = [chat_pair(source="a:1"),
             Pair("hello", "same", "same", "a:2"),  # no signal
             Pair("hello", "paris", "paris is", "a:3"),  # 'p' 'aris' + EOS vs 'p' 'aris' ' ' 'is' + EOS
             chat_pair(source="a:4")]
    kept, stats = tokenize_pairs(pairs, tiny_tokenizer, Truncation.of(DataArgs(max_completion_length=2)))
    assert [t.source for t in kept] == ["a:1", "a:4"]
    assert (stats.total, stats.kept, stats.completion_truncated) == (4, 2, 2)
    assert dict(stats.dropped) == {"identical": 1, "identical_after_truncation": 1}
    assert stats.summary() == ("tokenized 4 pairs: kept 2, prompt truncated 0, completion truncated 2, dropped 2 "
                               "(chosen and rejected are identical: 1, chosen and rejected identical after "
                               "truncation: 1)")


def test_all_dropped_explains_why(tiny_tokenizer):
    pairs = [chat_pair(source=f"a:{i}") for i in range(12)]
    with pytest.raises(PrefalignError) as e:
        tokenize_pairs(pairs, tiny_tokenizer, Truncation.of(DataArgs(max_length=8, truncation_mode="keep_start")))
    assert str(e.value) == ("--max_length: all 12 pairs dropped: no completion token left "
                            "(prompt fills --max_length=8): 12")


def test_all_dropped_names_the_split_and_its_file(tiny_tokenizer):
    pairs = [chat_pair(source=f"a:{i}") for i in range(3)]
    limits = Truncation.of(DataArgs(max_length=8, truncation_mode="keep_start"))
    with pytest.raises(PrefalignError) as e:
        tokenize_pairs(pairs, tiny_tokenizer, limits, what="evaluation set held.jsonl")
    assert str(e.value) == ("evaluation set held.jsonl: all 3 pairs dropped: no completion token left (prompt fills "
                            "--max_length=8): 3; raise --max_length / --max_completion_length")
    assert split_names(DataArgs(dataset_name="t.jsonl", eval_dataset_name="e.jsonl")) == (
        "training set t.jsonl", "evaluation set e.jsonl")
    assert split_names(DataArgs(dataset_name="t.jsonl", eval_split_ratio=0.1))[1] == (
        "evaluation set (--eval_split_ratio 0.1 of t.jsonl)")


def test_prompt_not_a_token_prefix_splits_where_tokens_diverge(tiny_tokenizer, caplog):
    """A template whose generation prompt adds text the full rendering lacks (as thinking templates do): the
    prompt is the common token prefix, the completion everything after it, and one warning is logged."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = tok.chat_template.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\nthink\\n'")
    with caplog.at_level(logging.WARNING, logger="prefalign.data"):
        kept, stats = tokenize_pairs([chat_pair(source="a:1"), chat_pair(source="a:2")], tok, Truncation.of(DataArgs()))
    assert pieces(tok, kept[0].prompt_ids) == PROMPT_PIECES and pieces(tok, kept[0].chosen_ids) == CHOSEN_PIECES
    assert stats.prefix_mismatch == 2
    (record,) = caplog.records
    assert record.getMessage().startswith("a:1: the prompt's tokens are not a prefix of prompt + answer's")


def test_conversational_without_template_names_the_flag(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    with pytest.raises(PrefalignError) as e:
        tokenize_pairs([chat_pair()], tok, Truncation.of(DataArgs()))
    assert e.value.where == "--chat_template"
    # raw text needs no template
    (tp,), _ = tokenize_pairs([Pair("hello", "four", "hi")], tok, Truncation.of(DataArgs()))
    assert pieces(tok, tp.chosen_ids) == ["f", "our", "<|im_end|>"]


@pytest.mark.parametrize(("kw", "flag"), [({"truncation_mode": "left"}, "--truncation_mode"),
                                          ({"max_length": 1}, "--max_length"),
                                          ({"max_prompt_length": 0}, "--max_prompt_length")])
def test_bad_flags(tiny_tokenizer, kw, flag):
    with pytest.raises(PrefalignError) as e:
        tokenize_pairs([chat_pair()], tiny_tokenizer, Truncation.of(DataArgs(**kw)))
    assert e.value.where == flag
