"""Reference forms (frozen copy, loaded model, disabled adapter, frozen twin adapter, none) and the disk cache.

Expected reference numbers come from an independently loaded model in the state the reference must equal
(the initial policy, the bare base, the SFT adapter) run through `completion_logps`, whose agreement with
the naive full-logits computation is tested in test_logprobs.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from prefalign.config import PolicyArgs
from prefalign.data.collate import collate_padded
from prefalign.data.types import TokenizedPair
from prefalign.errors import PrefalignError
from prefalign.model.load import POLICY_ADAPTER, REFERENCE_ADAPTER, load_policy, save_model
from prefalign.model.logprobs import completion_logps
from prefalign.model.reference import (
    AdapterReference,
    DisabledAdapterReference,
    FrozenModelReference,
    ReferenceSync,
    build_reference,
    cached_logps,
    fingerprint,
    mix_into_reference,
    precompute_reference,
    precompute_sequence_logps,
    reference_sources,
)

PAIRS = [
    TokenizedPair([5, 6, 7], [8, 9], [10, 11, 12, 13]),
    TokenizedPair([20], [21, 22, 23], [24]),
    TokenizedPair([30, 31], [35, 36, 37, 38], [41, 42]),
]


def _batch(pairs=PAIRS) -> dict:
    return collate_padded(list(pairs), pad_token_id=0)


def _expected(model) -> torch.Tensor:
    with torch.no_grad():
        return completion_logps(model.eval(), _batch()).token_logps


def _perturb(model, match: str = "", scale: float = 0.3) -> None:
    """Stand-in for an optimizer step: change every parameter whose name contains `match`."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if match in name:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def test_reference_free_loads_nothing(tiny_model_dir) -> None:
    policy = load_policy(PolicyArgs(model_name_or_path=str(tiny_model_dir)))
    args = PolicyArgs(model_name_or_path=str(tiny_model_dir), ref_model_name_or_path="/does/not/exist")
    assert build_reference(policy, args, loss_needs_reference=False) is None


def test_default_is_frozen_copy_of_initial_policy(tiny_model_dir) -> None:
    args = PolicyArgs(model_name_or_path=str(tiny_model_dir))
    policy = load_policy(args).train()
    ref = build_reference(policy, args, loss_needs_reference=True)
    assert isinstance(ref, FrozenModelReference)
    policy_ptrs = {p.data_ptr() for p in policy.parameters()}
    assert not any(p.data_ptr() in policy_ptrs for p in ref.model.parameters())
    assert not any(p.requires_grad for p in ref.model.parameters())

    _perturb(policy)  # training moves the policy; the reference stays at the initial weights
    out = ref.logps(_batch())
    assert not out.token_logps.requires_grad and out.token_logps.dtype == torch.float32
    torch.testing.assert_close(out.token_logps, _expected(AutoModelForCausalLM.from_pretrained(tiny_model_dir)))
    assert policy.training  # a separate reference never touches the policy's mode


def test_explicit_reference_model(tiny_model_dir, tiny_llama_dir) -> None:
    args = PolicyArgs(model_name_or_path=str(tiny_model_dir), ref_model_name_or_path=str(tiny_llama_dir))
    policy = load_policy(args)
    ref = build_reference(policy, args, loss_needs_reference=True)
    assert type(ref.model).__name__ == "LlamaForCausalLM"
    expected = _expected(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
    torch.testing.assert_close(ref.logps(_batch()).token_logps, expected)


def test_fresh_lora_uses_disabled_adapter_without_a_copy(tiny_model_dir) -> None:
    args = PolicyArgs(model_name_or_path=str(tiny_model_dir), use_peft=True, lora_r=4, lora_dropout=0.5)
    policy = load_policy(args).train()
    for module in policy.modules():  # real dropout in the base model too, so that a train-mode pass is random
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    before = [(p.data_ptr(), p.shape) for p in policy.parameters()]
    ref = build_reference(policy, args, loss_needs_reference=True)
    assert isinstance(ref, DisabledAdapterReference) and ref.model is policy
    assert [(p.data_ptr(), p.shape) for p in policy.parameters()] == before  # no new parameters anywhere

    _perturb(policy, "lora_B")  # a trained adapter changes the policy...
    out = ref.logps(_batch())
    # ...but the reference is the bare base, and deterministic although the policy is in train mode with dropout.
    torch.testing.assert_close(out.token_logps, _expected(AutoModelForCausalLM.from_pretrained(tiny_model_dir)))
    torch.testing.assert_close(ref.logps(_batch()).token_logps, out.token_logps, atol=0, rtol=0)
    assert policy.training and all(m.training for m in policy.modules())
    policy_out = completion_logps(policy, _batch())  # the adapter is back on after the reference pass
    assert (policy_out.token_logps - out.token_logps).abs().max() > 1e-3


def test_continued_adapter_uses_frozen_twin(tiny_model_dir, tiny_tokenizer, tmp_path) -> None:
    sft = load_policy(PolicyArgs(model_name_or_path=str(tiny_model_dir), use_peft=True, lora_r=4))
    _perturb(sft, "lora_B")
    save_model(sft, tiny_tokenizer, tmp_path / "sft", merge_adapter=False)
    expected = _expected(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "sft"))

    args = PolicyArgs(model_name_or_path=str(tiny_model_dir), peft_adapter_path=str(tmp_path / "sft"))
    policy = load_policy(args).train()
    policy.base_model.model.model.layers[1].eval()  # a mixed mode that must survive the pass unchanged
    modes = [m.training for m in policy.modules()]
    ref = build_reference(policy, args, loss_needs_reference=True)
    assert isinstance(ref, AdapterReference) and ref.adapter_name == REFERENCE_ADAPTER

    _perturb(policy, f"lora_B.{POLICY_ADAPTER}.")  # train the policy adapter only
    for name, p in policy.named_parameters():  # a trainer may freeze part of the adapter; peft's
        if "layers.0." in name and f"lora_A.{POLICY_ADAPTER}." in name:  # set_adapter would unfreeze it
            p.requires_grad_(False)
    grads_before = {n: p.requires_grad for n, p in policy.named_parameters()}
    out = ref.logps(_batch())
    torch.testing.assert_close(out.token_logps, expected)  # the SFT adapter, not the trained one
    assert {n: p.requires_grad for n, p in policy.named_parameters()} == grads_before
    assert policy.active_adapter == POLICY_ADAPTER
    assert [m.training for m in policy.modules()] == modes
    policy_out = completion_logps(policy, _batch())
    assert policy_out.token_logps.requires_grad
    assert (policy_out.token_logps - out.token_logps).abs().max() > 1e-3


# ---------------------------------------------------------------- precomputed reference log-probs


class ForwardCounter:
    def __init__(self, model) -> None:
        self.calls = 0
        model.register_forward_hook(self)

    def __call__(self, *_args) -> None:
        self.calls += 1


def test_precompute_caches_on_disk_and_reuses(tiny_model_dir, tmp_path) -> None:
    args = PolicyArgs(model_name_or_path=str(tiny_model_dir))
    ref = build_reference(load_policy(args), args, True)
    counter = ForwardCounter(ref.model)
    key = fingerprint(reference_sources(args), PAIRS, {"max_length": 1024})
    collate = lambda pairs: collate_padded(pairs, pad_token_id=0)  # noqa: E731

    first = precompute_reference(ref, PAIRS, collate, batch_size=2, cache_dir=tmp_path, fingerprint=key)
    assert counter.calls == 2  # ceil(3 pairs / 2)
    assert [(len(c), len(r)) for c, r in first] == [(2, 4), (3, 1), (4, 2)]
    assert (tmp_path / f"ref_logps-{key}.safetensors").exists()

    second = precompute_reference(ref, PAIRS, collate, batch_size=2, cache_dir=tmp_path, fingerprint=key)
    assert counter.calls == 2  # read from disk: no forward
    for (c1, r1), (c2, r2) in zip(first, second):
        assert torch.equal(c1, c2) and torch.equal(r1, r2)

    # Cached entries of a batch rebuild exactly what the live reference returns for that batch.
    live = ref.logps(_batch())
    cached = cached_logps(second)
    assert torch.equal(cached.mask, live.mask)
    torch.testing.assert_close(cached.token_logps, live.token_logps, atol=0, rtol=0)
    assert cached.logits_mean_sum.isnan().all() and cached.wpo_adjust is None
    sub = cached_logps([second[2], second[0]])  # any subset, in batch order
    assert sub.mask.sum(1).tolist() == [4, 2, 2, 4]

    other = fingerprint(reference_sources(args), PAIRS[:2], {"max_length": 1024})
    precompute_reference(ref, PAIRS[:2], collate, batch_size=8, cache_dir=tmp_path, fingerprint=other)
    assert counter.calls == 4  # new key: computed (1 batch), then the live pass above made it 4


def test_stale_cache_file_is_recomputed(tiny_model_dir, tmp_path) -> None:
    args = PolicyArgs(model_name_or_path=str(tiny_model_dir))
    ref = build_reference(load_policy(args), args, True)
    counter = ForwardCounter(ref.model)
    collate = lambda pairs: collate_padded(pairs, pad_token_id=0)  # noqa: E731
    precompute_reference(ref, PAIRS[:2], collate, 4, tmp_path, "samekey")
    # A file under the same key whose lengths do not fit these pairs is not trusted.
    entries = precompute_reference(ref, PAIRS, collate, 4, tmp_path, "samekey")
    assert counter.calls == 2 and len(entries) == 3


def test_fingerprint_tracks_model_data_and_settings(tiny_model_dir, tmp_path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in tiny_model_dir.iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    base = fingerprint([str(model_dir)], PAIRS, {"max_length": 8})
    assert fingerprint([str(model_dir)], PAIRS, {"max_length": 8}) == base  # deterministic
    assert fingerprint([str(model_dir)], PAIRS, {"max_length": 9}) != base
    assert fingerprint([str(model_dir)], PAIRS[::-1], {"max_length": 8}) != base
    # Moving one token from the prompt to the completion changes the key although the ids concatenate equally.
    shifted = [TokenizedPair([5, 6], [7, 8, 9], [10, 11, 12, 13]), *PAIRS[1:]]
    assert fingerprint([str(model_dir)], shifted, {"max_length": 8}) != base
    weights = model_dir / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # re-saved weights
    assert fingerprint([str(model_dir)], PAIRS, {"max_length": 8}) != base
    assert fingerprint(["org/hub-model"], PAIRS) != fingerprint(["org/other-model"], PAIRS)


def test_reference_sources() -> None:
    assert reference_sources(PolicyArgs(model_name_or_path="m", peft_adapter_path="a")) == [
        "m", "a", "dtype=float32", "4bit=False",
    ]  # fmt: skip
    assert reference_sources(PolicyArgs(model_name_or_path="m", ref_model_name_or_path="r", dtype="bfloat16"))[0] == "r"


@pytest.mark.parametrize("use_peft", [False, True])
def test_reference_pass_leaves_policy_training_intact(tiny_model_dir, use_peft) -> None:
    """A DPO step interleaves the reference pass with the policy's forward/backward; gradients still flow."""
    args = PolicyArgs(model_name_or_path=str(tiny_model_dir), use_peft=use_peft)
    policy = load_policy(args, gradient_checkpointing=True).train()
    ref = build_reference(policy, args, True)
    ref_out = ref.logps(_batch())
    loss = (completion_logps(policy, _batch()).token_logps - ref_out.token_logps).sum()
    loss.backward()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)


def test_tr_dpo_mix_by_hand_and_only_every_n_steps(tiny_model_dir, tiny_llama_dir) -> None:
    """θ_ref ← (1 − α)·θ_ref + α·θ_policy: with θ_ref = 1, θ_policy = 3 and α = 0.6 every entry becomes 2.2; the sync
    runs after optimizer steps 2, 4, ... (TRL's global_step % ref_model_sync_steps == 0)."""
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = FrozenModelReference(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    with torch.no_grad():
        for p in policy.parameters():
            p.fill_(3.0)
        for p in reference.model.parameters():
            p.fill_(1.0)
    sync = ReferenceSync(reference, policy, alpha=0.6, every=2)
    sync.after_step(1)
    assert all(bool((p == 1.0).all()) for p in reference.model.parameters())
    sync.after_step(2)
    assert all(torch.allclose(p, torch.full_like(p, 2.2)) for p in reference.model.parameters())
    assert not any(p.requires_grad for p in reference.model.parameters())
    mix_into_reference(reference.model, policy, 1.0)  # α = 1: the paper's hard update copies the policy
    assert all(bool((p == 3.0).all()) for p in reference.model.parameters())
    other = FrozenModelReference(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32))
    other.model.model.layers = other.model.model.layers[:1]  # a reference of another shape cannot be mixed
    with pytest.raises(PrefalignError, match="do not match the policy"):
        ReferenceSync(other, policy, 0.6, 2)
    with pytest.raises(PrefalignError, match="separate reference"):
        ReferenceSync(DisabledAdapterReference(policy), policy, 0.6, 2)


def test_sequence_logps_are_sums_and_cached(tiny_model_dir, tmp_path) -> None:
    from prefalign.data.collate import collate_padded_completions

    reference = FrozenModelReference(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    items = [(p.prompt_ids, p.chosen_ids) for p in PAIRS]
    collate = lambda chunk: collate_padded_completions([(p, [c]) for p, c in chunk], 0)  # noqa: E731
    values = precompute_sequence_logps(reference, items, collate, 2, tmp_path, "k")
    expected = reference.logps(collate(items)).token_logps.sum(-1)
    torch.testing.assert_close(values, expected)
    (file,) = tmp_path.glob("seq_logps-k.safetensors")
    stamp = file.stat().st_mtime_ns
    torch.testing.assert_close(precompute_sequence_logps(reference, items, collate, 2, tmp_path, "k"), values)
    assert file.stat().st_mtime_ns == stamp  # read, not recomputed
