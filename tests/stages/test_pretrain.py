"""Pretraining blocks: documents packed with EOS, attention and position ids kept inside each document."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from prefalign.data.collate import collate_rows
from prefalign.data.corpus import encode_documents, pack_documents
from prefalign.data.types import TokenizedSample
from prefalign.stages.causal_lm import lm_loss


def test_documents_are_cut_into_blocks_of_segments():
    docs = [[1, 2, 3, 9], [4, 5, 9], [6, 7, 8, 10, 11, 9]]
    blocks = pack_documents(docs, block_size=5, per_document=True)
    assert [[s.input_ids for s in b] for b in blocks] == [[[1, 2, 3, 9], [4]], [[5, 9], [6, 7, 8]], [[10, 11, 9]]]
    # every segment starts untargeted: nothing in its own context predicts its first token
    assert all(s.loss_mask == [False] + [True] * (len(s.input_ids) - 1) for b in blocks for s in b)
    flat = pack_documents(docs, block_size=5, per_document=False)
    assert [[s.input_ids for s in b] for b in flat] == [[[1, 2, 3, 9, 4]], [[5, 9, 6, 7, 8]], [[10, 11, 9]]]
    assert flat[0][0].loss_mask == [False, True, True, True, True]


def test_encode_documents_appends_eos(tiny_tokenizer):
    ids = encode_documents(["the cat", "blue"], tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    assert ids == [tiny_tokenizer("the cat", add_special_tokens=False)["input_ids"] + [eos],
                   tiny_tokenizer("blue", add_special_tokens=False)["input_ids"] + [eos]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_per_document_losses_equal_each_document_alone(tiny_model_dir, tiny_tokenizer, attn):
    """A block's loss is the sum of its documents' losses computed one document per forward; with plain
    concatenation the later documents see the earlier ones and the loss differs."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    docs = encode_documents(["the cat is blue", "what is two plus two", "hello world"], tiny_tokenizer)
    block_size = sum(len(d) for d in docs)
    [block] = pack_documents(docs, block_size, per_document=True)
    assert len(block) == 3
    packed_loss, packed_metrics = lm_loss(model, collate_rows([block], 0, segmented=True))
    alone = 0.0
    for doc in docs:
        ids = torch.tensor([doc])
        logps = model(ids).logits[0].log_softmax(-1)  # plain forward of the document on its own
        alone -= sum(logps[t - 1, doc[t]].item() for t in range(1, len(doc)))
    assert packed_loss.item() == pytest.approx(alone, rel=1e-5)
    assert packed_metrics["loss"][1] == sum(len(d) - 1 for d in docs)
    [flat] = pack_documents(docs, block_size, per_document=False)
    flat_loss, flat_metrics = lm_loss(model, collate_rows([flat], 0, segmented=False))
    assert flat_metrics["loss"][1] == block_size - 1
    assert abs(flat_loss.item() - packed_loss.item()) > 1e-3


def test_padding_is_a_segment_of_its_own(tiny_model_dir):
    """Two blocks of different lengths in one batch: the short one's loss is what it is alone."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    a = [TokenizedSample([5, 6, 7, 8, 9, 10], [False] + [True] * 5)]
    b = [TokenizedSample([11, 12, 13], [False, True, True])]
    together = lm_loss(model, collate_rows([a, b], 0, segmented=True))[0].item()
    apart = sum(lm_loss(model, collate_rows([r], 0, segmented=True))[0].item() for r in (a, b))
    assert together == pytest.approx(apart, rel=1e-5)
