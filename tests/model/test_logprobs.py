"""completion_logps against the obvious full-logits computation, and its memory behaviour.

The expected values come from the naive path every reader can check by eye:
`model(input_ids).logits.log_softmax(-1)`, take position t-1's row, pick token t's column, keep the positions
where completion_mask is 1, left-align each row. The lean path must agree to 1e-5 in float32, in values and
in gradients.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM

import prefalign.model.logprobs as logprobs_module
from helpers import peak_bytes, peak_bytes_bound
from prefalign.data.collate import collate_padded
from prefalign.data.types import TokenizedPair
from prefalign.errors import PrefalignError
from prefalign.model.logprobs import CompletionLogps, completion_logps, register_layout

PAIRS = [
    TokenizedPair(prompt_ids=[5, 6, 7], chosen_ids=[8, 9], rejected_ids=[10, 11, 12, 13]),
    TokenizedPair(prompt_ids=[20], chosen_ids=[21, 22, 23], rejected_ids=[24]),
    TokenizedPair(prompt_ids=[30, 31, 32, 33, 34], chosen_ids=[35, 36, 37, 38, 39, 40], rejected_ids=[41, 42]),
]


def _batch(pad: int = 0) -> dict:
    return collate_padded(PAIRS, pad_token_id=pad)


def naive(model, batch: dict) -> CompletionLogps:
    """Full logits -> log_softmax -> gather, then left-align each row's completion tokens by a plain loop."""
    ids, cm = batch["input_ids"], batch["completion_mask"].bool()
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits.float()  # (2B, T, V)
    logp = logits.log_softmax(-1)
    token = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (2B, T-1): position t-1 predicts t
    wpo = (2 * logp[:, :-1]).logsumexp(-1)  # (2B, T-1)
    mean = logits[:, :-1].mean(-1)  # (2B, T-1)
    keep = cm[:, 1:]
    width = int(cm.sum(1).max())
    rows = [
        torch.stack([torch.cat([v[k], v.new_zeros(width - int(k.sum()))]) for v, k in zip(values, keep)])
        for values in (token, wpo)
    ]
    mask = torch.stack([torch.arange(width) < int(k.sum()) for k in keep])
    mean_sum = torch.stack([m[k].sum() for m, k in zip(mean.detach(), keep)])
    return CompletionLogps(rows[0], mask, mean_sum, rows[1].detach())


def _assert_same(lean: CompletionLogps, ref: CompletionLogps, atol: float = 1e-5) -> None:
    assert lean.token_logps.dtype == torch.float32
    assert torch.equal(lean.mask, ref.mask)
    torch.testing.assert_close(lean.token_logps, ref.token_logps, atol=atol, rtol=0)
    torch.testing.assert_close(lean.logits_mean_sum, ref.logits_mean_sum, atol=atol, rtol=0)
    if lean.wpo_adjust is not None:
        torch.testing.assert_close(lean.wpo_adjust, ref.wpo_adjust, atol=atol, rtol=0)


@pytest.fixture(params=["qwen2", "llama"])
def model(request, tiny_model_dir, tiny_llama_dir):
    path = tiny_model_dir if request.param == "qwen2" else tiny_llama_dir
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_values_match_full_logits(model, chunk_size) -> None:
    batch = _batch()
    lean = completion_logps(model, batch, with_wpo=True, chunk_size=chunk_size)
    # Chosen rows first: pair 0's chosen has 2 tokens, pair 2's rejected (row 5) has 2 tokens.
    assert lean.mask.sum(1).tolist() == [2, 3, 6, 4, 1, 2]
    _assert_same(lean, naive(model, batch))


def test_gradients_match_full_logits(model) -> None:
    batch = _batch()
    weights = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))  # (2B, Tc), Tc = 6
    grads = []
    for fn in (lambda: completion_logps(model, batch, chunk_size=3), lambda: naive(model, batch)):
        model.zero_grad()
        (fn().token_logps * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(model.parameters()))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_peft_adapter_active_and_disabled(tiny_model_dir) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # fresh LoRA B is zero; make the adapter change the outputs
            torch.nn.init.normal_(p, std=0.5)
    batch = _batch()
    adapted = completion_logps(peft_model, batch, with_wpo=True, chunk_size=5)
    _assert_same(adapted, naive(peft_model, batch))
    with peft_model.disable_adapter():
        disabled = completion_logps(peft_model, batch, chunk_size=5)
    _assert_same(disabled, naive(plain, batch))
    assert (adapted.token_logps - disabled.token_logps).abs().max() > 1e-3  # the adapter really was on

    # Only LoRA weights get gradients through the lean path, and they match the naive path's.
    grads = []
    for fn in (lambda: completion_logps(peft_model, batch, chunk_size=2), lambda: naive(peft_model, batch)):
        peft_model.zero_grad()
        fn().token_logps.sum().backward()
        grads.append({n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None})
    assert grads[0] and all("lora_" in n for n in grads[0]) and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def _from_config(config_cls: str, vocab: int = 64, hidden: int = 32, **extra) -> torch.nn.Module:
    config = getattr(transformers, config_cls)(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(
    ("config_cls", "extra"),
    [
        ("Gemma2Config", {"final_logit_softcapping": 0.5, "head_dim": 8}),  # tanh soft-capping at 0.5
        ("CohereConfig", {"logit_scale": 4.0}),  # logits x 4
        ("GraniteConfig", {"logits_scaling": 0.25}),  # logits / 0.25
    ],
)
def test_logit_scale_and_softcapping_respected(config_cls, extra) -> None:
    model = _from_config(config_cls, **extra)
    batch = _batch()
    lean = completion_logps(model, batch, with_wpo=True, chunk_size=4)
    _assert_same(lean, naive(model, batch))
    # Sanity that the post-processing matters for this model (else the test could not fail).
    head = logprobs_module.resolve_head(model)
    assert head is not None and (head.scale != 1.0 or head.softcap is not None)


def test_full_forward_fallback(model, monkeypatch) -> None:
    """Model types listed as unusual use the full forward's logits and still give the same numbers."""
    monkeypatch.setattr(logprobs_module, "FULL_FORWARD_MODEL_TYPES", frozenset({model.config.model_type}))
    assert logprobs_module.resolve_head(model) is None
    batch = _batch()
    _assert_same(completion_logps(model, batch, with_wpo=True, chunk_size=4), naive(model, batch))


def test_bf16_autocast_returns_float32(tiny_model_dir) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean = completion_logps(model, batch)
        ref = naive(model, batch)
    assert lean.token_logps.dtype == torch.float32 and lean.logits_mean_sum.dtype == torch.float32
    torch.testing.assert_close(lean.token_logps, ref.token_logps, atol=2e-2, rtol=0)


def test_completion_at_position_zero_is_an_error(tiny_model_dir) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = collate_padded([TokenizedPair([], [5, 6], [7])], pad_token_id=0)
    with pytest.raises(PrefalignError, match="prompt must not be empty"):
        completion_logps(model, batch)


def test_layout_dispatch(tiny_model_dir) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="unknown batch layout 'nope'"):
        completion_logps(model, {"layout": "nope"})
    seen = []

    def padded_twice(model, batch, *, with_wpo, chunk_size):
        seen.append(chunk_size)
        return completion_logps(model, {**batch, "layout": "padded"}, with_wpo=with_wpo, chunk_size=chunk_size)

    register_layout("test_alias", padded_twice)
    try:
        out = completion_logps(model, {**_batch(), "layout": "test_alias"}, chunk_size=7)
    finally:
        logprobs_module._LAYOUTS.pop("test_alias")
    assert seen == [7] and out.token_logps.shape == (6, 6)


def test_empty_completions(tiny_model_dir) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    out = completion_logps(model, collate_padded([TokenizedPair([5, 6], [], [7])], pad_token_id=0))
    assert out.mask.tolist() == [[False], [True]] and out.token_logps[0, 0] == 0
    assert out.logits_mean_sum[0] == 0
    out.token_logps.sum().backward()  # still a valid graph


def test_through_ddp_wrapper(tiny_model_dir, tmp_path) -> None:
    """The forward goes through the wrapper (so DDP sees a normal call) and gradients reach the inner model."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        batch = _batch()
        lean = completion_logps(DistributedDataParallel(model), batch, with_wpo=True, chunk_size=4)
        _assert_same(lean, naive(model, batch))
        lean.token_logps.sum().backward()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- memory


def _step(model, batch, lean: bool, chunk_size: int = 32) -> None:
    out = completion_logps(model, batch, chunk_size=chunk_size) if lean else naive(model, batch)
    out.token_logps.sum().backward()


def _long_batch(seq: int, vocab: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=gen).tolist()  # noqa: E731
    pairs = [TokenizedPair(ids(8), ids(seq - 8), ids(seq - 8)) for _ in range(2)]  # 4 rows x seq tokens
    return collate_padded(pairs, pad_token_id=0)


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_vocab(monkeypatch) -> None:
    """Quadrupling the vocabulary adds ~rows*seq*dV*4 bytes to the naive peak but only O(chunk*dV + params).
    (Without the bounded store of kept logits, HEAD_KEEP_BYTES, whose budget would hold these small batches.)"""
    monkeypatch.setattr(logprobs_module, "HEAD_KEEP_BYTES", 0)
    seq, chunk, hidden = 128, 32, 16
    peaks = {}
    for vocab in (2000, 8000):
        model = _from_config("Qwen2Config", vocab=vocab, hidden=hidden)
        batch = _long_batch(seq, vocab)
        peaks[vocab] = (peak_bytes(_step, model, batch, True, chunk), peak_bytes(_step, model, batch, False))
    d_vocab = 6000
    positions = 4 * (seq - 8)  # scored completion positions
    full_logits_growth = positions * d_vocab * 4  # one float32 [positions, dV] tensor: 11.5 MB
    lean_growth = peaks[8000][0] - peaks[2000][0]
    naive_growth = peaks[8000][1] - peaks[2000][1]
    # The lean path may hold a few [chunk, V] float32 tensors and the [V, H] gradient of the head/embedding.
    allowed = 4 * chunk * d_vocab * 4 + 4 * d_vocab * hidden * 4  # 3.1 MB + 1.5 MB
    assert naive_growth > full_logits_growth, (naive_growth, full_logits_growth)  # the measure sees logits
    assert lean_growth < allowed < full_logits_growth, (lean_growth, allowed)
    assert peaks[8000][0] < peaks[8000][1] / 4


@pytest.mark.slow
def test_peak_memory_vocab_term_does_not_grow_with_seq(monkeypatch) -> None:
    """Doubling the sequence adds seq*H-sized activations to the lean peak, never seq*V-sized logits (past the
    kept logits' budget, here 0)."""
    monkeypatch.setattr(logprobs_module, "HEAD_KEEP_BYTES", 0)
    vocab, chunk, hidden = 8000, 32, 16
    model = _from_config("Qwen2Config", vocab=vocab, hidden=hidden)
    batches = {seq: _long_batch(seq, vocab) for seq in (64, 256)}
    lean = {seq: peak_bytes(_step, model, batch, True, chunk) for seq, batch in batches.items()}
    extra_positions = 4 * (256 - 64)
    logits_growth = extra_positions * vocab * 4  # 24.6 MB if logits of all positions were kept
    assert lean[256] - lean[64] < logits_growth / 4, (lean, logits_growth)


# ---------------------------------------------------------------- the head chunk's own backward


def _checkpointed(logits_fn, x, targets, with_wpo, with_entropy, keep, *params):
    """What the head chunk was before `_HeadChunk`: torch's checkpoint of the whole scoring function."""
    return checkpoint(logprobs_module._score_chunk, logits_fn, x, targets, with_wpo, with_entropy,
                      use_reentrant=False)


def _chunk_results(score, head: torch.nn.Module, logits_fn, with_stats: bool, keep: bool) -> list[torch.Tensor]:
    """Outputs and the gradients of the inputs and every head parameter, for a fixed weighting of the log-probs."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(13, 16, generator=gen).requires_grad_()
    targets = torch.randint(0, 300, (13,), generator=gen)
    head.zero_grad()
    trainable = [p for p in head.parameters() if p.requires_grad]
    outs = score(logits_fn, x, targets, with_stats, with_stats, keep, *trainable)
    (outs[0] * torch.linspace(-1, 2, 13)).sum().backward()
    grads = [p.grad for p in trainable]
    assert all(g is not None for g in grads) and x.grad is not None
    return [o.detach().clone() for o in outs] + [x.grad.clone()] + [g.clone() for g in grads]


def _lora_head() -> torch.nn.Module:
    base = torch.nn.Sequential()
    base.add_module("lm_head", torch.nn.Linear(16, 300, bias=False))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    return model.base_model.model.lm_head


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("with_stats", [False, True])
@pytest.mark.parametrize(
    ("head_kind", "post"),
    [("linear", None), ("linear", "temperature"), ("linear", "softcap"), ("lora", None)],
)
def test_head_chunk_equals_a_checkpoint_exactly(head_kind, post, with_stats, keep) -> None:
    """The hand-written backward evaluates autograd's own expression: values and gradients are bit-identical to
    the checkpointed chunk, whether the logits are recomputed or kept, for a plain head, temperature, tanh
    soft-capping (whose backward reads its saved output) and a LoRA head (only the adapter's tensors trainable)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300) if head_kind == "linear" else _lora_head()

    def logits_fn(h):
        logits = head(h).float()
        if post == "temperature":
            return logits / 0.7
        return torch.tanh(logits / 0.5) * 0.5 if post == "softcap" else logits

    new = _chunk_results(logprobs_module._HeadChunk.apply, head, logits_fn, with_stats, keep)
    old = _chunk_results(_checkpointed, head, logits_fn, with_stats, keep)
    assert len(new) == len(old)
    for a, b in zip(new, old):
        assert torch.equal(a, b)


def test_recomputed_chunk_under_bf16_autocast() -> None:
    """Backward recomputes the logits under the autocast the forward ran under (as torch's checkpoint does)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300)

    def run(score):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _chunk_results(score, head, lambda h: head(h).float(), True, False)

    for a, b in zip(run(logprobs_module._HeadChunk.apply), run(_checkpointed)):
        assert torch.equal(a, b)


def _assert_gradients_match_naive(model, batch: dict, chunk_size: int) -> None:
    """Every parameter's gradient of the summed log-probs, lean path against the naive one."""
    grads = []
    for fn in (lambda: completion_logps(model, batch, chunk_size=chunk_size), lambda: naive(model, batch)):
        model.zero_grad()
        fn().token_logps.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_tied_head_gradients_reach_the_embedding() -> None:
    """With tied embeddings the head's weight is the embedding's: it gets both gradients, as on the naive path."""
    model = _from_config("Qwen2Config", tie_word_embeddings=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    _assert_gradients_match_naive(model, _batch(), chunk_size=3)


def _head_step(score, keep: bool) -> int:
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 20000, bias=False)
    x = torch.randn(64, 16, requires_grad=True)
    targets = torch.randint(0, 20000, (64,))

    def step():
        score(lambda h: head(h).float(), x, targets, False, True, keep, head.weight)[0].sum().backward()

    return peak_bytes_bound(step)


def test_head_chunk_backward_peak_is_below_a_checkpoint() -> None:
    """The hand-written backward holds the chunk's logits (recomputed or kept) and one gradient buffer, beside the
    head's weight gradient: 2 x 5.12 MB + 1.28 MB here. A checkpoint of the whole chunk also re-runs the entropy's
    pass and keeps the log-softmax's saved tensors and its backward's temporaries: more than 4 x 5.12 MB."""
    logits_bytes, weight_grad = 64 * 20000 * 4, 20000 * 16 * 4
    old = _head_step(_checkpointed, False)
    recomputed, kept = _head_step(logprobs_module._HeadChunk.apply, False), _head_step(logprobs_module._HeadChunk.apply, True)
    assert old > 4 * logits_bytes, old
    assert recomputed <= 2 * logits_bytes + weight_grad + 2**16, recomputed
    assert kept <= recomputed, (kept, recomputed)


def test_logits_are_kept_up_to_the_budget(monkeypatch) -> None:
    """The first chunks of a forward, those wholly within HEAD_KEEP_BYTES of logits, are kept; the rest are
    recomputed in backward. Either way the gradient is the naive path's."""
    kept = []
    original = logprobs_module._HeadChunk.forward

    def spy(ctx, logits_fn, inputs, targets, with_wpo, with_entropy, keep, *params):
        kept.append((inputs.shape[0], keep))
        return original(ctx, logits_fn, inputs, targets, with_wpo, with_entropy, keep, *params)

    model = _from_config("Qwen2Config")  # vocabulary 64: a position's logits are 256 bytes
    monkeypatch.setattr(logprobs_module._HeadChunk, "forward", staticmethod(spy))
    monkeypatch.setattr(logprobs_module, "HEAD_KEEP_BYTES", 7 * 64 * 4)  # 7 positions
    # 18 completion positions: chunks of 3 -> 6 chunks, the first two (6 positions) within the budget
    _assert_gradients_match_naive(model, _batch(), chunk_size=3)
    assert kept == [(3, True), (3, True), (3, False), (3, False), (3, False), (3, False)]


def test_entropy_and_logsumexp_against_float64() -> None:
    """The scores share one exp pass: the logsumexp is bit-identical to torch's, the entropy within 2e-5 of a
    float64 computation on an 8k vocabulary, far closer than a softmax and one batched dot product per row."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 8192, generator=gen) * 3
    targets = torch.randint(0, 8192, (64,), generator=gen)
    logps, mean, _, entropy, lse = logprobs_module._scores(logits, targets, False, True)
    assert torch.equal(lse, logits.logsumexp(-1))
    assert torch.equal(logps, logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1))
    logp64 = logits.double().log_softmax(-1)
    expected = -(logp64.exp() * logp64).sum(-1)
    ours = (entropy.double() - expected).abs().max()
    probs = logits.softmax(-1)
    batched_dot = logits.logsumexp(-1) - (probs.unsqueeze(1) @ logits.unsqueeze(2)).view(-1)
    assert ours < 2e-5 and ours * 10 < (batched_dot.double() - expected).abs().max(), ours


@pytest.mark.parametrize("width", [5, 256, 1000, 8192, 151936 // 16])
def test_row_dot(width) -> None:
    gen = torch.Generator().manual_seed(width)
    a, b = torch.randn(3, width, generator=gen), torch.randn(3, width, generator=gen)
    expected = (a.double() * b.double()).sum(-1)
    torch.testing.assert_close(logprobs_module.row_dot(a, b).double(), expected, atol=1e-5 * width**0.5, rtol=0)
