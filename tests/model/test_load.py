"""Loading the tokenizer and policy from local directories, LoRA set-ups, and saving that reloads."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefalign.config import ModelArgs
from prefalign.errors import PrefalignError
from prefalign.model.load import POLICY_ADAPTER, REFERENCE_ADAPTER, load_policy, load_tokenizer, save_model

IDS = torch.tensor([[5, 6, 7, 8, 9, 10]])
LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _randomize_lora(model: PeftModel, seed: int = 0) -> None:
    """A fresh LoRA B is zero (the adapter is a no-op); give it weights so that saving/reloading can be checked."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_from_model_dir(tiny_model_dir) -> None:
    tok = load_tokenizer(ModelArgs(model_name_or_path=str(tiny_model_dir)))
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"


def test_tokenizer_without_pad_gets_eos(tiny_model_dir, tmp_path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    args = ModelArgs(model_name_or_path="unused/because-tokenizer-given", tokenizer_name_or_path=str(tmp_path))
    loaded = load_tokenizer(args)
    assert loaded.pad_token == "<|im_end|>" and loaded.pad_token_id == loaded.eos_token_id


def test_tokenizer_missing_dir_names_flag(tmp_path) -> None:
    args = ModelArgs(model_name_or_path="x", tokenizer_name_or_path=str(tmp_path / "absent"))
    with pytest.raises(PrefalignError) as err:
        load_tokenizer(args)
    assert err.value.where == "--tokenizer_name_or_path"


# ---------------------------------------------------------------- policy


def test_full_model_dtype_and_attention(tiny_model_dir) -> None:
    args = ModelArgs(model_name_or_path=str(tiny_model_dir), dtype="bfloat16", attn_implementation="eager")
    model = load_policy(args)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", ["/no/such/dir", "./relative/missing", "nobody/no-such-model-offline"])
def test_missing_model_is_a_prefalign_error(name) -> None:
    with pytest.raises(PrefalignError) as err:
        load_policy(ModelArgs(model_name_or_path=name))
    assert err.value.where == "--model_name_or_path"
    assert name in str(err.value) and "\n" not in str(err.value)


def test_unknown_dtype(tiny_model_dir) -> None:
    with pytest.raises(PrefalignError, match="unknown dtype"):
        load_policy(ModelArgs(model_name_or_path=str(tiny_model_dir), dtype="float8"))


def test_lora_trains_only_adapters_on_all_linear_layers(tiny_model_dir) -> None:
    model = load_policy(ModelArgs(model_name_or_path=str(tiny_model_dir), use_peft=True, lora_r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    adapted = {n.split(".lora_")[0] for n in trainable}
    # 2 layers x 7 linear projections, each with an A and a B matrix; the LM head is not adapted.
    assert len(adapted) == 14 and len(trainable) == 28
    assert {a.split(".")[-1] for a in adapted} == LINEAR
    assert not any("lm_head" in n or "embed" in n for n in trainable)


def test_lora_target_modules_flag(tiny_llama_dir) -> None:
    args = ModelArgs(model_name_or_path=str(tiny_llama_dir), use_peft=True, lora_target_modules=["q_proj", "v_proj"])
    model = load_policy(args)
    adapted = {n.split(".lora_")[0].split(".")[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"q_proj", "v_proj"}


def test_gradient_checkpointing_with_peft_still_trains_adapters(tiny_model_dir) -> None:
    model = load_policy(ModelArgs(model_name_or_path=str(tiny_model_dir), use_peft=True), gradient_checkpointing=True)
    layers = model.get_base_model().model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert all(layer._gradient_checkpointing_func.keywords == {"use_reentrant": False} for layer in layers)
    model.train()
    model(input_ids=IDS).logits.sum().backward()
    # Every adapter, including the first layer's, receives a gradient through the checkpointed blocks.
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_A" in n}
    assert grads and all(g is not None for g in grads.values())


def _saved_adapter(tiny_model_dir, tiny_tokenizer, out) -> PeftModel:
    model = load_policy(ModelArgs(model_name_or_path=str(tiny_model_dir), use_peft=True, lora_r=4))
    _randomize_lora(model)
    save_model(model, tiny_tokenizer, out, merge_adapter=False)
    return model


def test_adapter_loaded_twice(tiny_model_dir, tiny_tokenizer, tmp_path) -> None:
    trained = _saved_adapter(tiny_model_dir, tiny_tokenizer, tmp_path / "sft")
    args = ModelArgs(model_name_or_path=str(tiny_model_dir), peft_adapter_path=str(tmp_path / "sft"))
    model = load_policy(args)
    assert set(model.peft_config) == {POLICY_ADAPTER, REFERENCE_ADAPTER}
    assert model.active_adapter == POLICY_ADAPTER
    params = dict(model.named_parameters())
    policy = {n: p for n, p in params.items() if f".{POLICY_ADAPTER}." in n}
    reference = {n: p for n, p in params.items() if f".{REFERENCE_ADAPTER}." in n}
    assert len(policy) == len(reference) == 28
    for name, p in policy.items():
        twin = reference[name.replace(f".{POLICY_ADAPTER}.", f".{REFERENCE_ADAPTER}.")]
        assert torch.equal(p, twin) and p.data_ptr() != twin.data_ptr()  # same values, separate storage
        assert p.requires_grad and not twin.requires_grad
    assert [n for n, p in params.items() if p.requires_grad] == list(policy)
    torch.testing.assert_close(_logits(model), _logits(trained))


def test_missing_adapter_dir(tiny_model_dir, tmp_path) -> None:
    args = ModelArgs(model_name_or_path=str(tiny_model_dir), peft_adapter_path=str(tmp_path / "nope"))
    with pytest.raises(PrefalignError) as err:
        load_policy(args)
    assert err.value.where == "--peft_adapter_path"


# ---------------------------------------------------------------- saving


def test_save_full_model_reloads(tiny_model_dir, tiny_tokenizer, tmp_path) -> None:
    model = load_policy(ModelArgs(model_name_or_path=str(tiny_model_dir)))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.5)  # a "trained" change the reload must carry
    save_model(model, tiny_tokenizer, tmp_path / "out", merge_adapter=False)
    assert (tmp_path / "out" / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(_logits(reloaded), _logits(model), atol=0, rtol=0)
    assert AutoTokenizer.from_pretrained(tmp_path / "out").encode("hello world") == tiny_tokenizer.encode("hello world")


def test_save_peft_saves_only_policy_adapter_and_merged(tiny_model_dir, tiny_tokenizer, tmp_path) -> None:
    _saved_adapter(tiny_model_dir, tiny_tokenizer, tmp_path / "sft")
    args = ModelArgs(model_name_or_path=str(tiny_model_dir), peft_adapter_path=str(tmp_path / "sft"))
    model = load_policy(args)
    with torch.no_grad():  # train the policy adapter a little so that it differs from the reference one
        for name, p in model.named_parameters():
            if f"lora_B.{POLICY_ADAPTER}." in name:
                p.mul_(2)
    out = tmp_path / "dpo"
    save_model(model, tiny_tokenizer, out, merge_adapter=True)

    assert not (out / REFERENCE_ADAPTER).exists()  # peft would put a second adapter in a subdirectory
    keys = load_file(out / "adapter_model.safetensors").keys()
    assert len(keys) == 28 and not any(REFERENCE_ADAPTER in k for k in keys)
    expected = _logits(model)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(base, out)), expected, atol=1e-5, rtol=0)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged), expected, atol=1e-5, rtol=0)
    # Saving did not merge into (or unload) the live training model.
    assert set(model.peft_config) == {POLICY_ADAPTER, REFERENCE_ADAPTER}
    torch.testing.assert_close(_logits(model), expected, atol=0, rtol=0)


@pytest.fixture()
def remote_code_dir(tiny_model_dir, tmp_path):
    """The tiny model with an auto_map pointing at a module that, when imported, leaves a marker file: what a
    checkpoint carrying its own code looks like. The classes it names are transformers' own."""
    import json
    import shutil

    d = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, d)
    marker = tmp_path / "remote_code_ran"
    # subclasses, so that running this code (the control below) registers only them in transformers
    (d / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                               "from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification\n"
                               "class EvilConfig(Qwen2Config):\n    pass\n"
                               "class EvilModel(Qwen2ForCausalLM):\n    config_class = EvilConfig\n"
                               "class EvilScore(Qwen2ForSequenceClassification):\n    config_class = EvilConfig\n")
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel",
                          "AutoModelForSequenceClassification": "evil.EvilScore"}
    (d / "config.json").write_text(json.dumps(config))
    return d, marker


def test_no_loader_runs_checkpoint_code_unless_asked(remote_code_dir) -> None:
    """trust_remote_code stays off in every loader: the policy's, the reward and value models' (scorer, PPO's
    value model) and the chat/eval one; only --trust_remote_code runs the checkpoint's code."""
    from prefalign.model.load import load_model_for_inference, load_pretrained, load_score_model
    from prefalign.rollout.rewards import RewardModelScorer

    d, marker = remote_code_dir
    load_tokenizer(ModelArgs(model_name_or_path=str(d)))
    load_policy(ModelArgs(model_name_or_path=str(d)))
    load_score_model(str(d), "--value_model_name_or_path")
    load_model_for_inference(str(d))
    with pytest.raises(PrefalignError, match="without a trained score head"):  # loaded (no code run), then refused
        RewardModelScorer(d)
    assert not marker.exists()
    model = load_pretrained(str(d), ModelArgs(trust_remote_code=True), "--model_name_or_path")
    assert marker.exists() and type(model).__name__ == "EvilModel"  # the fixture carries code; only the flag runs it


def test_a_classification_checkpoint_is_refused_as_a_causal_lm(tiny_reward_model_dir) -> None:
    from prefalign.model.load import load_model_for_inference, load_pretrained

    message = (f"{tiny_reward_model_dir} is a Qwen2ForSequenceClassification checkpoint (a reward/classification "
               "model); a policy must be a causal language model (…ForCausalLM)")
    for load, flag in ((lambda: load_pretrained(str(tiny_reward_model_dir), ModelArgs(), "--ref_model_name_or_path"),
                        "--ref_model_name_or_path"),
                       (lambda: load_model_for_inference(str(tiny_reward_model_dir)), "--model_name_or_path")):
        with pytest.raises(PrefalignError) as e:
            load()
        assert str(e.value) == f"{flag}: {message}"


def test_lora_targets_and_vocabulary_are_checked(tiny_model_dir, tiny_llama_dir, tmp_path) -> None:
    from helpers import build_tokenizer
    from prefalign.model.checks import check_lora_targets, check_vocab

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    check_lora_targets(model, ["q_proj", "self_attn.v_proj", "layers.0.mlp.up_proj"])  # names and dotted suffixes
    with pytest.raises(PrefalignError) as e:
        check_lora_targets(model, ["q_proj", "qproj"])  # one typo beside a real name would leave a layer bare
    assert str(e.value) == ("--lora_target_modules: LlamaForCausalLM has no module named 'qproj'; its linear layers "
                            "are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj")
    check_vocab(model, AutoTokenizer.from_pretrained(tiny_model_dir), "--model_name_or_path")
    big = build_tokenizer(tmp_path / "big", vocab_size=500)
    with pytest.raises(PrefalignError) as e:
        check_vocab(model, big, "--tokenizer_name_or_path")
    assert str(e.value) == (f"--tokenizer_name_or_path: the tokenizer has {len(big)} tokens but the model's embedding "
                            "has 400 rows (larger ids would index past it); use the model's own tokenizer")
