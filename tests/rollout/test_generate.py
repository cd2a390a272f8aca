"""Rollouts from the real tiny Qwen2: layout, EOS cut, truncation, seeds, peft, the group prefill against
`model.generate`, sampling in shares, and the token draw."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM

import prefalign.rollout.generate as generate_module
from prefalign.errors import PrefalignError
from prefalign.rollout.generate import (
    SamplingParams,
    decode_friendly_head,
    draw_tokens,
    generate_completions,
    left_pad,
    mask_truncated_completions,
    warp_logits,
)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def _with_eos_bias(tiny_model_dir, tokenizer, bias: float):
    """The tiny model with an LM head that adds `bias` to the EOS logit (a bias-carrying copy of the tied head)."""
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    head = torch.nn.Linear(m.config.hidden_size, m.config.vocab_size, bias=True)
    head.weight.data.copy_(m.lm_head.weight.data)
    head.bias.data.zero_()
    head.bias.data[tokenizer.eos_token_id] = bias
    m.lm_head = head
    return m


def _prompts(tok):
    return [tok("the capital of france is")["input_ids"], tok("two plus")["input_ids"]]


def test_layout_grouping_and_left_padding(model, tiny_tokenizer):
    prompts = _prompts(tiny_tokenizer)
    long, short = prompts
    out = generate_completions(model, tiny_tokenizer, prompts, num_generations=3, max_completion_length=5, seed=0)
    pad = tiny_tokenizer.pad_token_id
    assert out.prompt_ids.tolist() == [long] * 3 + [[pad] * (len(long) - len(short)) + short] * 3
    assert out.prompt_mask.sum(1).tolist() == [len(long)] * 3 + [len(short)] * 3
    assert out.completion_ids.shape[0] == 6 and out.completion_ids.shape[1] <= 5
    assert out.completion_mask.shape == out.completion_ids.shape and len(out.texts) == 6
    for row, n, text in zip(out.completion_ids, out.completion_lengths.tolist(), out.texts):
        assert text == tiny_tokenizer.decode(row[:n].tolist(), skip_special_tokens=True)
        assert row[n:].tolist() == [pad] * (len(row) - n)
    assert left_pad([[5], [6, 7]], 0)[0].tolist() == [[0, 5], [6, 7]]


def test_seed_is_deterministic_and_leaves_global_rng(model, tiny_tokenizer):
    prompts = _prompts(tiny_tokenizer)
    state = torch.get_rng_state()
    a = generate_completions(model, tiny_tokenizer, prompts, num_generations=4, max_completion_length=6, seed=7)
    b = generate_completions(model, tiny_tokenizer, prompts, num_generations=4, max_completion_length=6, seed=7)
    c = generate_completions(model, tiny_tokenizer, prompts, num_generations=4, max_completion_length=6, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert not torch.equal(a.completion_ids, c.completion_ids)
    # G samples of one prompt differ from each other (sampling, not G copies of one sample)
    assert len({tuple(r) for r in a.completion_ids[:4].tolist()}) > 1


def test_certain_eos_stops_after_one_token(tiny_model_dir, tiny_tokenizer):
    m = _with_eos_bias(tiny_model_dir, tiny_tokenizer, 60.0)
    out = generate_completions(m, tiny_tokenizer, _prompts(tiny_tokenizer), num_generations=2, max_completion_length=8, seed=0)
    eos = tiny_tokenizer.eos_token_id
    assert out.completion_ids.tolist() == [[eos]] * 4
    assert out.completion_mask.tolist() == [[1]] * 4
    assert out.is_truncated.tolist() == [False] * 4
    assert out.texts == [""] * 4


def test_impossible_eos_truncates(tiny_model_dir, tiny_tokenizer):
    m = _with_eos_bias(tiny_model_dir, tiny_tokenizer, -1e4)
    out = generate_completions(m, tiny_tokenizer, _prompts(tiny_tokenizer), num_generations=2, max_completion_length=5, seed=0)
    assert out.completion_ids.shape == (4, 5)
    assert out.completion_mask.tolist() == [[1] * 5] * 4
    assert out.is_truncated.tolist() == [True] * 4
    assert mask_truncated_completions(out.completion_mask, out.is_truncated).sum().item() == 0


def test_eos_in_the_middle_cuts_the_mask(tiny_model_dir, tiny_tokenizer):
    """With EOS made likely (+4 on its logit) some rows stop early: the mask covers tokens up to the first EOS."""
    m = _with_eos_bias(tiny_model_dir, tiny_tokenizer, 4.0)
    out = generate_completions(m, tiny_tokenizer, _prompts(tiny_tokenizer), num_generations=6, max_completion_length=6, seed=3)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    stopped_early = 0
    for row, n, truncated in zip(out.completion_ids.tolist(), out.completion_lengths.tolist(), out.is_truncated.tolist()):
        if truncated:
            assert eos not in row and n == 6
        else:
            assert row.index(eos) == n - 1 and row[n:] == [pad] * (len(row) - n)
            stopped_early += n < out.completion_ids.size(1)
    assert stopped_early > 0 and out.is_truncated.any() and not out.is_truncated.all()
    kept = mask_truncated_completions(out.completion_mask, out.is_truncated)
    assert kept.sum(1).tolist() == [0 if t else n for t, n in zip(out.is_truncated.tolist(), out.completion_lengths.tolist())]


def test_batched_top1_matches_each_prompt_alone(model, tiny_tokenizer):
    """top_k = 1 is greedy: left padding must not change what a prompt produces."""
    prompts = _prompts(tiny_tokenizer)
    both = generate_completions(model, tiny_tokenizer, prompts, num_generations=1, max_completion_length=6, top_k=1)
    for i, p in enumerate(prompts):
        alone = generate_completions(model, tiny_tokenizer, [p], num_generations=1, max_completion_length=6, top_k=1)
        n = alone.completion_lengths[0].item()
        assert both.completion_ids[i, :n].tolist() == alone.completion_ids[0, :n].tolist()


def test_peft_model_and_disable_adapter(tiny_model_dir, tiny_tokenizer, model):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    # init_lora_weights=False: B is random too, so the adapter really changes the policy
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False))
    prompts = _prompts(tiny_tokenizer)
    kw = {"num_generations": 3, "max_completion_length": 6, "seed": 11}
    plain = generate_completions(model, tiny_tokenizer, prompts, **kw)
    adapted = generate_completions(peft_model, tiny_tokenizer, prompts, **kw)
    with peft_model.disable_adapter():
        reference = generate_completions(peft_model, tiny_tokenizer, prompts, **kw)
    assert torch.equal(reference.completion_ids, plain.completion_ids)
    assert not torch.equal(adapted.completion_ids, plain.completion_ids)
    peft_model.train()
    generate_completions(peft_model, tiny_tokenizer, prompts, **kw)
    assert peft_model.training  # mode restored after sampling in eval mode


def test_bad_inputs(model, tiny_tokenizer):
    with pytest.raises(PrefalignError, match="temperature"):
        generate_completions(model, tiny_tokenizer, [[1, 2]], num_generations=1, max_completion_length=2, temperature=0)
    with pytest.raises(PrefalignError, match="at least one token"):
        generate_completions(model, tiny_tokenizer, [[]], num_generations=1, max_completion_length=2)


def test_group_prefill_decodes_as_generate(model, tiny_tokenizer):
    """top_k = 1 makes sampling greedy: one prefill per prompt, its cache copied to the G rows, decodes exactly
    what transformers' generate decodes from the G repeated prompts."""
    prompts = _prompts(tiny_tokenizer)
    ours = generate_completions(model, tiny_tokenizer, prompts, num_generations=2, max_completion_length=6, top_k=1)
    ids, mask = left_pad([p for p in prompts for _ in range(2)], tiny_tokenizer.pad_token_id)
    theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                            pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    for row, n in enumerate(ours.completion_lengths.tolist()):
        assert ours.completion_ids[row, :n].tolist() == theirs[row, ids.shape[1] : ids.shape[1] + n].tolist()


def test_a_rollout_sampled_in_shares_or_chunks_is_the_same(model, tiny_tokenizer):
    """Each row draws the noise of its place in the whole rollout (RowNoise): two processes' shares, or chunks of
    2 rows, sample what one call over all 3 prompts x 2 samples does."""
    prompts = _prompts(tiny_tokenizer) + [tiny_tokenizer("hello world")["input_ids"]]
    kw = {"num_generations": 2, "max_completion_length": 6, "seed": 5}
    whole = generate_completions(model, tiny_tokenizer, prompts, **kw)
    chunks = generate_completions(model, tiny_tokenizer, prompts, batch_size=2, **kw)
    first = generate_completions(model, tiny_tokenizer, prompts[:1], first_row=0, total_rows=6, **kw)
    rest = generate_completions(model, tiny_tokenizer, prompts[1:], first_row=2, total_rows=6, **kw)
    assert chunks.texts == whole.texts and first.texts + rest.texts == whole.texts
    assert len(set(whole.texts)) > 1


def test_draw_tokens_inverts_the_cumulative_distribution():
    """probs [0.1, 0, 0.6, 0.3], cumulative [0.1, 0.1, 0.7, 1.0]; token = first whose cumulative reaches 1 - u:
    u 0.95 -> 0.05 -> 0; u 0.89 -> 0.11 -> 2 (the zero-probability token is never drawn); u 0.5 -> 2; u 0 -> 3."""
    logits = torch.tensor([0.1, 0.0, 0.6, 0.3]).log().expand(4, 4)
    assert draw_tokens(logits, torch.tensor([0.95, 0.89, 0.5, 0.0])).tolist() == [0, 2, 2, 3]
    # Blocks of 2 tokens ([0.1, 0] [0.6, 0.3]): the same draws, and a block ending in zero-probability tokens is
    # never left at its end.
    assert draw_tokens(logits, torch.tensor([0.95, 0.89, 0.5, 0.0]), block=2).tolist() == [0, 2, 2, 3]
    padded = torch.tensor([0.3, 0.0, 0.0, 0.7, 0.0]).log().expand(3, 5)
    assert draw_tokens(padded, torch.tensor([0.7, 0.69, 0.0]), block=3).tolist() == [0, 3, 3]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(0.7, None, 1.0), (1.0, 5, 1.0), (1.3, None, 0.8),
                                                             (0.9, 7, 0.6)])
def test_warp_logits_equals_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = warp_logits(logits, SamplingParams(8, temperature, top_p, top_k))
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got[~torch.isinf(got)], expected[~torch.isinf(expected)])


def test_decode_friendly_head_changes_only_the_weight_layout(tiny_model_dir, tiny_tokenizer, monkeypatch):
    """While decoding, a trained CPU head's weight is stored transposed: the same values and shape, the same
    completions, and the parameter's own storage is back afterwards (also after an error). A frozen head is left
    as it is."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)  # untied
    weight = model.lm_head.weight
    storage, values = weight.data_ptr(), weight.detach().clone()
    with decode_friendly_head(model):
        assert not weight.is_contiguous() and weight.t().is_contiguous() and torch.equal(weight, values)
    assert weight.data_ptr() == storage and weight.is_contiguous()
    with pytest.raises(RuntimeError, match="boom"), decode_friendly_head(model):
        raise RuntimeError("boom")
    assert weight.data_ptr() == storage

    kw = {"num_generations": 3, "max_completion_length": 6, "seed": 3}
    ours = generate_completions(model, tiny_tokenizer, _prompts(tiny_tokenizer), **kw)
    monkeypatch.setattr(generate_module, "decode_friendly_head", lambda m: contextlib.nullcontext())
    plain = generate_completions(model, tiny_tokenizer, _prompts(tiny_tokenizer), **kw)
    assert torch.equal(ours.completion_ids, plain.completion_ids)

    weight.requires_grad_(False)  # frozen (a LoRA run's head): no extra copy while sampling
    with decode_friendly_head(model):
        assert weight.data_ptr() == storage
