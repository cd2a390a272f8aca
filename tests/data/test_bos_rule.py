"""Raw text with a BOS-adding tokenizer: prefalign tokenizes it as TRL 1.16 does, checked against TRL's own code.

The tokenizer is built offline with a post-processor that adds `<|begin_of_text|>` to every encoding, as Llama 3's
does (tests/helpers.build_llama3_style_tokenizer). TRL's DPO, KTO, SFT and GRPO tokenization is called directly
(`DPOTrainer._prepare_dataset`, `KTOTrainer._prepare_dataset`, `SFTTrainer._prepare_dataset`,
`GRPOTrainer._tokenize_prompts`) on the same rows.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from datasets import Dataset
from trl import DPOTrainer, GRPOTrainer, KTOTrainer, SFTTrainer

from helpers import LLAMA3_BOS, LLAMA3_EOS, build_llama3_style_tokenizer, conv, write_jsonl
from prefalign.config import DataArgs, InspectConfig, KTOConfig, SFTConfig
from prefalign.data.corpus import encode_documents
from prefalign.data.formats import normalize_pair
from prefalign.data.inspect import inspect_dataset
from prefalign.data.prompts import normalize_prompt_row, tokenize_prompts
from prefalign.data.sft import normalize_sft_row, tokenize_sft
from prefalign.data.tokenize import Truncation, tokenize_pairs
from prefalign.data.unpaired import normalize_feedback, tokenize_unpaired

# A prompt ending in a space (its last token merges with the answer's first), one on a word boundary, an answer
# that already ends in EOS, and a multi-line template-style prompt.
RAW_PAIRS = [
    {"prompt": "Question: what is two plus two\n\nAnswer: ", "chosen": "four", "rejected": "hello"},
    {"prompt": "the sky is", "chosen": " blue", "rejected": f" red{LLAMA3_EOS}"},
    {"prompt": "hello world\nuser:", "chosen": " yes please", "rejected": " no"},
]


@pytest.fixture(scope="module")
def llama3_tokenizer():
    return build_llama3_style_tokenizer()


def _trl_args(**kw):
    return SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_end", **kw)


def test_dpo_raw_pairs_match_trl(llama3_tokenizer):
    tok = llama3_tokenizer
    trl = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tok), Dataset.from_list(RAW_PAIRS), tok,
                                      _trl_args(), "train")
    args = DataArgs(max_length=None)
    ours, stats = tokenize_pairs([normalize_pair(r, f"x:{i}", args) for i, r in enumerate(RAW_PAIRS)], tok,
                                 Truncation.of(args))
    for want, got in zip(trl, ours):
        assert (got.prompt_ids, got.chosen_ids, got.rejected_ids) == (
            want["prompt_ids"], want["chosen_ids"], want["rejected_ids"])
    assert all(t.prompt_ids[0] == tok.bos_token_id for t in ours)  # the BOS the tokenizer adds by default
    assert tok.convert_ids_to_tokens(ours[0].chosen_ids) == ["Ġfour", LLAMA3_EOS]  # the space went with the answer
    assert stats.prefix_mismatch == 1  # only the prompt that ends in a space


def test_kto_raw_examples_match_trl(llama3_tokenizer):
    tok = llama3_tokenizer
    rows = [{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in RAW_PAIRS]
    rows += [{"prompt": p["prompt"], "completion": p["rejected"], "label": False} for p in RAW_PAIRS]
    trl_self = SimpleNamespace(_tokenizer=tok, calculate_KL=False)
    trl = KTOTrainer._prepare_dataset(trl_self, Dataset.from_list(rows), tok, _trl_args(), "train")
    cfg = KTOConfig(max_length=None)
    examples = [e for i, r in enumerate(rows) for e in normalize_feedback(r, f"x:{i}", cfg)]
    ours, _ = tokenize_unpaired(examples, tok, Truncation.of(cfg))
    assert [(t.prompt_ids, t.completion_ids) for t in ours] == [(w["prompt_ids"], w["completion_ids"]) for w in trl]
    assert all(t.prompt_ids[0] == tok.bos_token_id for t in ours)


@pytest.mark.parametrize("rows", [
    [{"prompt": "the sky is", "completion": " blue"}, {"prompt": "Answer: ", "completion": "four"}],
    [{"text": "hello world"}, {"text": f"the sky is blue{LLAMA3_EOS}"}],
], ids=["prompt-completion", "text"])
def test_sft_raw_text_matches_trl(llama3_tokenizer, rows):
    tok = llama3_tokenizer
    trl_self = SimpleNamespace(_tokenizer=tok, chat_template=None, completion_only_loss=True)
    trl = SFTTrainer._prepare_dataset(trl_self, Dataset.from_list(rows), tok,
                                      _trl_args(dataset_text_field="text", assistant_only_loss=False,
                                                shuffle_dataset=False),
                                      False, None, "train")
    cfg = SFTConfig(max_length=None)
    ours, _ = tokenize_sft([normalize_sft_row(r, f"x:{i}", cfg) for i, r in enumerate(rows)], tok, cfg)
    for want, got in zip(trl, ours):
        assert got.input_ids == want["input_ids"] and got.input_ids[0] == tok.bos_token_id
        # TRL's labels are the inputs, -100 where untrained; position 0 is never predicted in either
        assert got.loss_mask[1:] == [label != -100 for label in want["labels"][1:]]


def test_rl_string_prompts_match_trl_and_chat_prompts_get_one_bos(llama3_tokenizer):
    tok = llama3_tokenizer
    prompts = ["what is two plus two", "Question: hello\n\nAnswer:"]
    trl_ids, _, _ = GRPOTrainer._tokenize_prompts(SimpleNamespace(processing_class=tok), prompts)
    args = DataArgs()
    examples = [normalize_prompt_row({"prompt": p}, f"x:{i}", args) for i, p in enumerate(prompts)]
    ours, _ = tokenize_prompts(examples, tok)
    assert ours == [list(ids) for ids in trl_ids] and all(ids[0] == tok.bos_token_id for ids in ours)
    # a conversational prompt: the template writes BOS, nothing is added on top of it
    (chat,), _ = tokenize_prompts([normalize_prompt_row({"prompt": conv(("user", "hi"))}, "x:1", args)], tok)
    assert tok.convert_ids_to_tokens(chat).count(LLAMA3_BOS) == 1 and chat[0] == tok.bos_token_id


def test_data_inspect_shows_the_bos(llama3_tokenizer, tmp_path):
    tok_dir = tmp_path / "tok"
    llama3_tokenizer.save_pretrained(tok_dir)
    data = write_jsonl(tmp_path / "raw.jsonl", RAW_PAIRS)
    cfg = InspectConfig(tokenizer_name_or_path=str(tok_dir), dataset_name=str(data), row=1)
    report = inspect_dataset(cfg, llama3_tokenizer, row=1, color=False)
    assert f"prompt:   {llama3_tokenizer.bos_token_id}:{LLAMA3_BOS} " in report
    assert "BOS <|begin_of_text|> added by the tokenizer" in report
    # unpaired feedback (KTO rows): the same note on each example of the row
    feedback = write_jsonl(tmp_path / "feedback.jsonl", [{"prompt": "the sky is", "completion": " blue",
                                                          "label": True}])
    cfg = InspectConfig(tokenizer_name_or_path=str(tok_dir), dataset_name=str(feedback))
    report = inspect_dataset(cfg, llama3_tokenizer, color=False)
    assert "(desirable; raw text: no chat template, BOS <|begin_of_text|> added by the tokenizer" in report
    assert f"{llama3_tokenizer.bos_token_id}:{LLAMA3_BOS} " in report


def test_pretraining_documents_start_with_the_tokenizers_bos(llama3_tokenizer):
    """Not a TRL trainer: documents are raw text too, tokenized by default as transformers' run_clm does."""
    tok = llama3_tokenizer
    docs = encode_documents(["hello world", f"the sky{LLAMA3_EOS}"], tok)
    assert [d[0] for d in docs] == [tok.bos_token_id] * 2 and [d[-1] for d in docs] == [tok.eos_token_id] * 2
    assert tok.convert_ids_to_tokens(docs[1]).count(LLAMA3_EOS) == 1  # already there: not doubled
