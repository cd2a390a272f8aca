"""The packed / shared-prompt forward equals the padded one: token log-probs, DPO and GRPO losses and gradients.

Expected values are not hard-coded: each test computes the same quantity two independent ways on a real
transformers model (tiny Qwen2 / Llama from the session fixtures, fp32) and requires agreement to 1e-5.
The naive reference is `model(prompt + completion).logits.log_softmax(-1)` run on each sequence alone, with
no padding, no packing and no chunked head; the padded path is `model.logprobs`' own layout.
"""

from __future__ import annotations

import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Qwen2Config

import prefalign.model.packed  # noqa: F401  (registers the "packed" layout)
from prefalign.data.collate import collate_padded
from prefalign.data.packing import collate_packed
from prefalign.data.types import TokenizedPair
from prefalign.losses.grpo import grpo_loss
from prefalign.model.logprobs import completion_logps
from prefalign.model.packed import (
    PREFIX,
    install_packed_attention,
    supports_packing,
    uninstall_packed_attention,
)
from prefalign.rollout.sampling import CompletionGroups

ATOL = 1e-5
BETA = 0.1


def load(model_dir, attn: str = "sdpa", seed: int | None = None):
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32)
    if seed is not None:  # a different set of weights, e.g. a reference that differs from the policy
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
    return model


def conversation(tokenizer, rng: random.Random, turns: int) -> list[int]:
    """A multi-turn ChatML prompt (history is most of the tokens, as in hh-rlhf)."""
    words = ["the", "cat", "is", "blue", "what", "can", "you", "help", "me", "with", "this", "dog", "paris", "number", "two", "plus", "three"]
    messages = [{"role": "system", "content": "you are a good assistant"}]
    for t in range(turns):
        messages.append({"role": "user" if t % 2 == 0 else "assistant",
                         "content": " ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))})
    if messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": "thank you"})
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


def make_pairs(tokenizer, seed: int = 0, n: int = 4, turns: int = 7) -> list[TokenizedPair]:
    """Pairs of mixed lengths: multi-turn prompts, completions of 1 to 25 tokens, chosen/rejected unequal."""
    rng = random.Random(seed)
    vocab = len(tokenizer)
    pairs = []
    for i in range(n):
        prompt = conversation(tokenizer, rng, turns=rng.randint(1, turns))
        chosen = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 25))] + [tokenizer.eos_token_id]
        rejected = [rng.randrange(3, vocab) for _ in range(rng.randint(0, 25))] + [tokenizer.eos_token_id]
        pairs.append(TokenizedPair(prompt, chosen, rejected, source=f"gen:{i + 1}"))
    return pairs


def naive_token_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p(completion | prompt) per token from one unpadded full forward."""
    ids = torch.tensor([prompt + completion])
    logps = model(ids).logits.float().log_softmax(-1)[0]  # (T, V)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return logps[positions, torch.tensor(completion)]


def dpo_loss(policy, reference, batch) -> torch.Tensor:
    """Sigmoid DPO, inline: -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), summed token log-probs."""
    pi = completion_logps(policy, batch).token_logps.sum(1)  # (2B,)
    with torch.no_grad():
        ref = completion_logps(reference, batch).token_logps.sum(1)
    b = batch["num_pairs"]
    margin = (pi[:b] - ref[:b]) - (pi[b:] - ref[b:])
    return -torch.nn.functional.logsigmoid(BETA * margin).mean()


def grads_of(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(params=["qwen2", "llama"])
def model_dir(request, tiny_model_dir, tiny_llama_dir):
    return tiny_model_dir if request.param == "qwen2" else tiny_llama_dir


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("share_prompt", [True, False])
def test_packed_token_logps_equal_padded_and_naive(model_dir, tiny_tokenizer, attn, share_prompt):
    model = load(model_dir, attn)
    pairs = make_pairs(tiny_tokenizer, seed=1, n=5)
    padded = completion_logps(model, collate_padded(pairs, tiny_tokenizer.pad_token_id), with_wpo=True)
    packed = completion_logps(
        model, collate_packed(pairs, tiny_tokenizer.pad_token_id, share_prompt), with_wpo=True, chunk_size=7
    )
    assert torch.equal(packed.mask, padded.mask)
    torch.testing.assert_close(packed.token_logps, padded.token_logps, atol=ATOL, rtol=0)
    torch.testing.assert_close(packed.logits_mean_sum, padded.logits_mean_sum, atol=ATOL, rtol=0)
    torch.testing.assert_close(packed.wpo_adjust, padded.wpo_adjust, atol=ATOL, rtol=0)
    # And both equal the plain full forward of each sequence alone.
    with torch.no_grad():
        for i, pair in enumerate(pairs):
            for row, completion in ((i, pair.chosen_ids), (len(pairs) + i, pair.rejected_ids)):
                expected = naive_token_logps(model, pair.prompt_ids, completion)
                torch.testing.assert_close(packed.token_logps[row, : len(completion)], expected, atol=ATOL, rtol=0)
    assert packed.token_logps.requires_grad


@pytest.mark.parametrize("share_prompt", [True, False])
def test_dpo_loss_and_gradients_equal_padded(model_dir, tiny_tokenizer, share_prompt):
    policy, reference = load(model_dir), load(model_dir, seed=3)
    pairs = make_pairs(tiny_tokenizer, seed=2, n=4)
    loss_padded = dpo_loss(policy, reference, collate_padded(pairs, tiny_tokenizer.pad_token_id))
    grads_padded = grads_of(policy, loss_padded)
    loss_packed = dpo_loss(policy, reference, collate_packed(pairs, tiny_tokenizer.pad_token_id, share_prompt))
    grads_packed = grads_of(policy, loss_packed)
    assert abs(loss_padded.item() - 0.6931) > 1e-3  # the reference differs from the policy: a real margin
    torch.testing.assert_close(loss_packed, loss_padded, atol=ATOL, rtol=0)
    assert grads_packed.keys() == grads_padded.keys() and len(grads_packed) > 10
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], grad, atol=ATOL, rtol=0, msg=name)


def test_lora_adapter_loss_and_gradients_equal_padded(model_dir, tiny_tokenizer):
    """Policy = LoRA adapter; reference = the same model with the adapter disabled (peft's reference trick)."""
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
                        init_lora_weights=False)  # random B, so the adapter changes the model from the start
    model = get_peft_model(load(model_dir), config)
    pairs = make_pairs(tiny_tokenizer, seed=4, n=4)

    def loss_of(batch):
        pi = completion_logps(model, batch).token_logps.sum(1)
        with torch.no_grad(), model.disable_adapter():
            ref = completion_logps(model, batch).token_logps.sum(1)
        b = batch["num_pairs"]
        return -torch.nn.functional.logsigmoid(BETA * ((pi[:b] - ref[:b]) - (pi[b:] - ref[b:]))).mean()

    loss_padded = loss_of(collate_padded(pairs, tiny_tokenizer.pad_token_id))
    grads_padded = grads_of(model, loss_padded)
    loss_packed = loss_of(collate_packed(pairs, tiny_tokenizer.pad_token_id, share_prompt=True))
    grads_packed = grads_of(model, loss_packed)
    assert all("lora_" in name for name in grads_packed) and len(grads_packed) >= 10
    torch.testing.assert_close(loss_packed, loss_padded, atol=ATOL, rtol=0)
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], grad, atol=ATOL, rtol=0, msg=name)


def test_gradient_checkpointing_recomputes_the_same_blocks(tiny_model_dir, tiny_tokenizer):
    """Backward re-runs the layers after the forward returned; the installed attention must still see blocks."""
    pairs = make_pairs(tiny_tokenizer, seed=5, n=3)
    batch = collate_packed(pairs, tiny_tokenizer.pad_token_id, share_prompt=True)
    plain = load(tiny_model_dir)
    expected = grads_of(plain, completion_logps(plain, batch).token_logps.sum())
    model = load(tiny_model_dir)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # checkpointing is active only in training mode; the tiny models have no dropout
    got = grads_of(model, completion_logps(model, batch).token_logps.sum())
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=ATOL, rtol=0, msg=name)


def test_installed_attention_leaves_padded_batches_unchanged(tiny_model_dir, tiny_tokenizer):
    model = load(tiny_model_dir)
    batch = collate_padded(make_pairs(tiny_tokenizer, seed=6, n=3), tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        before = completion_logps(model, batch).token_logps
        install_packed_attention(model)
        install_packed_attention(model)  # idempotent
        assert model.config._attn_implementation == PREFIX + "sdpa"
        after = completion_logps(model, batch).token_logps
        uninstall_packed_attention(model)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(before, after)  # the very same kernel: bit-identical, not merely close


def test_packed_row_is_one_forward_of_all_pairs(tiny_model_dir, tiny_tokenizer):
    """A pair's log-probs do not depend on its neighbours in the row (the blocks really isolate pairs)."""
    model = load(tiny_model_dir)
    pairs = make_pairs(tiny_tokenizer, seed=7, n=3)
    with torch.no_grad():
        together = completion_logps(model, collate_packed(pairs, tiny_tokenizer.pad_token_id, True)).token_logps
        alone = completion_logps(model, collate_packed(pairs[1:2], tiny_tokenizer.pad_token_id, True)).token_logps
    width = alone.shape[1]
    torch.testing.assert_close(together[[1, 4], :width], alone, atol=ATOL, rtol=0)


def test_supports_packing_reasons(tiny_model_dir):
    assert supports_packing(load(tiny_model_dir)) == (True, "ok")
    assert supports_packing(load(tiny_model_dir, "eager")) == (True, "ok")
    sliding = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=0)
    ok, reason = supports_packing(AutoModelForCausalLM.from_config(sliding))
    assert not ok and "sliding-window" in reason
    model = load(tiny_model_dir)
    model.config._attn_implementation = "flex_attention"
    ok, reason = supports_packing(model)
    assert not ok and "flex_attention" in reason


# ---------------------------------------------------------------- completion groups (GRPO / RLOO rollouts)


def make_groups(tokenizer, seed: int = 0, prompts: int = 3, generations: int = 4):
    """A rollout's CompletionGroups: multi-turn prompts, G completions of 1 to 12 tokens each (some end in EOS)."""
    rng = random.Random(seed)
    vocab = len(tokenizer)
    prompt_ids = [conversation(tokenizer, rng, turns=rng.randint(1, 5)) for _ in range(prompts)]
    lengths = [rng.randint(1, 12) for _ in range(prompts * generations)]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.tensor([rng.randrange(3, vocab) for _ in range(n)])
        mask[row, :n] = 1
        if row % 3 == 0:
            ids[row, n - 1] = tokenizer.eos_token_id
    return CompletionGroups(prompt_ids, generations, ids, mask, tokenizer.pad_token_id)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_grouped_rows_equal_padded_and_naive(model_dir, tiny_tokenizer, attn):
    """A micro-batch of rows 2..9 (a partial group, a whole one, a partial one): the shared-prompt row gives the
    log-probs and entropies (at a sampling temperature) of padded rows and of each sequence alone."""
    model = load(model_dir, attn)
    groups = make_groups(tiny_tokenizer, seed=1)
    rows = list(range(2, 10))
    kw = {"with_entropy": True, "temperature": 0.7, "chunk_size": 5}
    packed_batch = groups.batch(rows, packed=True)
    assert packed_batch["input_ids"].shape[1] < groups.batch(rows, packed=False)["attention_mask"].sum()
    packed = completion_logps(model, packed_batch, **kw)
    padded = completion_logps(model, groups.batch(rows, packed=False), **kw)
    torch.testing.assert_close(packed.token_logps, padded.token_logps, atol=ATOL, rtol=0)
    torch.testing.assert_close(packed.entropy, padded.entropy, atol=ATOL, rtol=0)
    with torch.no_grad():
        for k, row in enumerate(rows):
            completion = groups.completion(row)
            ids = torch.tensor([groups.prompt_of(row) + completion])
            logps = (model(ids).logits.float() / 0.7).log_softmax(-1)[0]
            positions = torch.arange(len(groups.prompt_of(row)) - 1, ids.shape[1] - 1)
            expected = logps[positions, torch.tensor(completion)]
            torch.testing.assert_close(packed.token_logps[k, : len(completion)], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_grpo_loss_and_gradients_with_shared_prompts_equal_padded(model_dir, tiny_tokenizer, loss_type):
    """The GRPO loss of a micro-batch (off-policy, with the KL to a different reference) and every parameter's
    gradient are the same whether the groups' prompts run once or once per completion."""
    policy, reference = load(model_dir), load(model_dir, seed=3)
    groups = make_groups(tiny_tokenizer, seed=2)
    rows = list(range(len(groups)))
    old = groups.logps(reference, 5, 1.0, packed=False) * 0.9  # any fixed tensor will do as old log-probs
    ref = groups.logps(reference, 5, 1.0, packed=True)
    torch.testing.assert_close(ref, groups.logps(reference, 5, 1.0, packed=False), atol=ATOL, rtol=0)
    advantages = torch.linspace(-1, 1, len(rows))

    def loss_of(packed: bool):
        out = completion_logps(policy, groups.batch(rows, packed), with_entropy=True)
        loss, _ = grpo_loss(out.token_logps, advantages, groups.completion_mask, loss_type=loss_type,
                            old_per_token_logps=old, ref_per_token_logps=ref, entropies=out.entropy, beta=0.1)
        return loss

    loss_padded = loss_of(False)
    grads_padded = grads_of(policy, loss_padded)
    loss_packed = loss_of(True)
    grads_packed = grads_of(policy, loss_packed)
    torch.testing.assert_close(loss_packed, loss_padded, atol=ATOL, rtol=0)
    assert grads_packed.keys() == grads_padded.keys() and len(grads_packed) > 10
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], grad, atol=ATOL, rtol=0, msg=name)
