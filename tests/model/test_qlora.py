"""QLoRA (--load_in_4bit) on the CPU with bitsandbytes' CPU kernels: the 4-bit base, the CPU-repacking trap,
DPO end to end with its adapter reloaded on 4-bit and full-precision bases, the merge into the dequantized base, and
a continued adapter on a 4-bit base."""

from __future__ import annotations

import gc
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from helpers import conv, run_cli, write_gguf, write_jsonl
from prefalign.config import ModelArgs
from prefalign.config.tools import ModelShape
from prefalign.model.init import init_model
from prefalign.model.load import load_policy
from prefalign.model.quant import is_4bit, no_cpu_repacking
from prefalign.train.metrics import read_metrics

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def model64_dir(tmp_path_factory, tiny_tokenizer):
    """A 2-layer Llama whose every linear layer has sides that are multiples of bitsandbytes' 64-weight blocks
    (the shapes its CPU repacking handles, so that the trap below is the real one)."""
    shape = ModelShape(architecture="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, intermediate_size=128, max_position_embeddings=512)
    d = tmp_path_factory.mktemp("llama64")
    init_model(shape, tiny_tokenizer, seed=0).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    rows = [{"prompt": conv(("user", f"what is {a} + 2")), "chosen": conv(("assistant", f"{a} + 2 = {a + 2}")),
             "rejected": conv(("assistant", f"{a} + 2 = {a + 3} no"))} for a in range(4)]
    return write_jsonl(tmp_path_factory.mktemp("qlora_data") / "pairs.jsonl", rows)


IDS = torch.tensor([[5, 17, 33, 2, 40, 61, 7, 12]])


def _adapter_grads(model64_dir, eval_pass_first: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # the same LoRA A init in every call
    model = load_policy(ModelArgs(model_name_or_path=str(model64_dir), load_in_4bit=True, lora_r=4, lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would leave lora_A without gradient
            p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    if eval_pass_first:  # what a reference pass, an evaluation or a generation does before training
        model.eval()
        with torch.no_grad():
            model(IDS)
    model.train()
    model(IDS).logits.logsumexp(-1).sum().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_4bit_base_on_cpu_trains_only_adapters_with_right_gradients(model64_dir):
    model = load_policy(ModelArgs(model_name_or_path=str(model64_dir), load_in_4bit=True, lora_r=4))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14  # 7 linear layers x 2 blocks; the LM head stays full precision
    assert all(m.weight.quant_type == "nf4" and m.compute_dtype == torch.float32 for m in layers)
    assert all(m.support_avx512bf16_for_cpu is False for m in layers)  # the repacking is off
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # The trap: without switching the repacking off, an eval-mode no-grad forward on an AVX512-BF16 CPU repacks the
    # weights for good and later backward passes go through a kernel with no autograd (wrong adapter gradients).
    plain, after_eval = _adapter_grads(model64_dir, False), _adapter_grads(model64_dir, True)
    assert plain.keys() == after_eval.keys() and len(plain) == 28
    assert all(torch.equal(plain[n], after_eval[n]) for n in plain)


def _load_4bit(model_dir, auto_class=AutoModelForCausalLM, **kwargs):
    """The 4-bit base as a user would load it, with the CPU repacking off (else its eval forwards run bitsandbytes'
    bf16 inference kernel, measured 2.5e-3 away from the float32 compute here)."""
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = auto_class.from_pretrained(model_dir, quantization_config=config, **kwargs)
    no_cpu_repacking(model)
    return model


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits  # (1, T, V)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
def test_a_4bit_load_releases_the_checkpoints_memory_map(model64_dir, tmp_path):
    """The tensors a 4-bit load leaves unquantized are copied out of the memory-mapped safetensors file, so its
    pages (all read while quantizing) are not kept resident; a float32 load keeps its lazily read map."""
    copy = shutil.copytree(model64_dir, tmp_path / "model")

    def mapped() -> bool:
        return str(copy / "model.safetensors") in Path("/proc/self/maps").read_text()

    fp32 = load_policy(ModelArgs(model_name_or_path=str(copy), use_peft=True))
    assert mapped()  # the control: transformers maps the checkpoint
    del fp32
    gc.collect()
    assert not mapped()
    qlora = load_policy(ModelArgs(model_name_or_path=str(copy), load_in_4bit=True))
    gc.collect()
    assert not mapped() and is_4bit(qlora)


def test_qlora_dpo_on_cpu_saves_an_adapter_that_reloads_and_merges(model64_dir, pairs_file, tmp_path):
    out = tmp_path / "qlora"
    assert run_cli("dpo", model64_dir, pairs_file, out, "--max_steps", 2, "--per_device_train_batch_size", 2,
                   "--load_in_4bit", "--lora_r", 4, "--learning_rate", 1e-2, "--merge_adapter") == 0
    records = read_metrics(out / "metrics.jsonl")
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # reference = the disabled adapter
    assert records[1]["rewards/margins"] > 0
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model64_dir)
    on_4bit = PeftModel.from_pretrained(_load_4bit(model64_dir), str(out))
    base_4bit = _load_4bit(model64_dir)
    assert isinstance(on_4bit.get_base_model().model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear4bit)
    assert not torch.equal(_logits(on_4bit), _logits(base_4bit))  # the trained adapter is applied
    on_fp32 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model64_dir), str(out))
    assert torch.isfinite(_logits(on_fp32)).all()
    # The merged model is the adapter on the dequantized 4-bit weights: plain Linear layers, same outputs.
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert "quantization_config" not in json.loads((out / "merged" / "config.json").read_text())
    assert type(merged.model.layers[0].mlp.up_proj) is torch.nn.Linear
    torch.testing.assert_close(_logits(merged), _logits(on_4bit), atol=1e-4, rtol=0)
    assert AutoTokenizer.from_pretrained(out / "merged").chat_template


def test_qlora_step_one_log_probs_are_near_the_fp32_run(model64_dir, pairs_file, tmp_path):
    """Step 1 computes before any update, so each run's log-probs are its base model's. 4-bit rounding moves them;
    measured on this tiny random model (batch means of per-sequence sums, fp32 -54.4 / -60.3 nats): nf4 0.097 / 0.104,
    fp4 with double quantization 0.057 / 0.043. The tolerance is 0.3 nats; a real model drifts far more (SmolLM2-135M:
    a mean of 1-2 nats per token, measured separately), so this only says both runs compute the same thing."""
    logged = {}
    for name, extra in (("fp32", ["--use_peft"]), ("nf4", ["--load_in_4bit"]),
                        ("fp4", ["--load_in_4bit", "--bnb_4bit_quant_type", "fp4", "--use_bnb_nested_quant"])):
        assert run_cli("dpo", model64_dir, pairs_file, tmp_path / name, "--max_steps", 1, "--lora_r", 4,
                       "--per_device_train_batch_size", 4, *extra) == 0
        logged[name] = read_metrics(tmp_path / name / "metrics.jsonl")[0]
    for name in ("nf4", "fp4"):
        for key in ("logps/chosen", "logps/rejected"):
            diff = abs(logged[name][key] - logged["fp32"][key])
            assert 0 < diff < 0.3, (name, key, diff)


def test_continued_adapter_on_a_4bit_base(model64_dir, pairs_file, tmp_path):
    """--peft_adapter_path with --load_in_4bit: the adapter is both the trainable policy and the frozen reference in
    one 4-bit base, so step 1 has policy == reference."""
    first = tmp_path / "first"
    assert run_cli("dpo", model64_dir, pairs_file, first, "--max_steps", 2, "--load_in_4bit", "--lora_r", 4,
                   "--learning_rate", 1e-2) == 0
    out = tmp_path / "continued"
    assert run_cli("dpo", model64_dir, pairs_file, out, "--max_steps", 1, "--load_in_4bit",
                   "--peft_adapter_path", first) == 0
    record = read_metrics(out / "metrics.jsonl")[0]
    assert record["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert record["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    # the continued run started from the first run's adapter, not from a fresh one (B = 0)
    assert record["logps/chosen"] != read_metrics(first / "metrics.jsonl")[0]["logps/chosen"]


def test_sft_and_grpo_train_on_a_4bit_base(model64_dir, tmp_path):
    """The other --use_peft stages: SFT, and GRPO, whose rollouts run the 4-bit base in eval mode between updates."""
    rows = [{"prompt": conv(("user", f"what is {a} + 2")), "completion": conv(("assistant", f"{a + 2}"))}
            for a in range(4)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    assert run_cli("sft", model64_dir, data, tmp_path / "sft", "--max_steps", 2, "--load_in_4bit",
                   "--per_device_train_batch_size", 2, "--learning_rate", 1e-2) == 0
    sft = read_metrics(tmp_path / "sft" / "metrics.jsonl")
    assert sft[-1]["loss"] < sft[0]["loss"]
    assert (tmp_path / "sft" / "adapter_model.safetensors").is_file()
    assert run_cli("grpo", model64_dir, data, tmp_path / "grpo", "--max_steps", 2, "--load_in_4bit",
                   "--reward_funcs", "length:3", "--num_generations", 2, "--per_device_train_batch_size", 4,
                   "--max_completion_length", 4, "--beta", 0.1, "--learning_rate", 1e-2) == 0
    grpo = [r for r in read_metrics(tmp_path / "grpo" / "metrics.jsonl") if "reward" in r]
    assert grpo[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # the reference is the disabled adapter
    assert grpo[1]["kl"] > 0  # the adapter moved after the first update, through rollouts in eval mode


PROMPTS = [{"prompt": conv(("user", f"what is {a} + 2"))} for a in range(4)]
RL = ["--max_completion_length", "4", "--reward_funcs", "length:3", "--per_device_train_batch_size", "4"]
OTHER_STAGES = {  # command -> (rows, flags): the --use_peft stages test_qlora does not run above
    "pretrain": ([{"text": f"{a} plus 2 makes {a + 2}"} for a in range(4)], ["--max_length", "16"]),
    "kto": ([{"prompt": conv(("user", f"what is {a} + 2")), "completion": conv(("assistant", f"{a + 2 + a % 2}")),
              "label": a % 2 == 0} for a in range(4)], ["--per_device_train_batch_size", "4"]),
    "rloo": (PROMPTS, [*RL, "--num_generations", "2"]),
    "ppo": (PROMPTS, [*RL, "--num_ppo_epochs", "1"]),
    "online-dpo": (PROMPTS, RL),
    "distill": ([{"prompt": conv(("user", f"what is {a} + 2")), "completion": conv(("assistant", f"{a + 2}"))}
                 for a in range(4)], ["--max_new_tokens", "4", "--lmbda", "0.5", "--per_device_train_batch_size", "2"]),
}


@pytest.mark.parametrize("command", sorted(OTHER_STAGES))
def test_every_other_peft_stage_trains_on_a_4bit_base(command, model64_dir, tmp_path, capsys):
    rows, flags = OTHER_STAGES[command]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    if command == "distill":
        flags = [*flags, "--teacher_model_name_or_path", str(model64_dir)]
    out = tmp_path / command
    assert run_cli(command, model64_dir, data, out, "--max_steps", 2, "--load_in_4bit", "--lora_r", 4,
                   "--learning_rate", 1e-2, *flags) == 0
    assert "QLoRA r=4" in capsys.readouterr().out  # the run summary says what trained
    assert (out / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(_load_4bit(model64_dir), str(out))
    assert isinstance(reloaded.get_base_model().model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear4bit)
    assert torch.isfinite(_logits(reloaded)).all()


def test_reward_model_on_a_4bit_body_trains_its_full_precision_head(model64_dir, pairs_file, tmp_path):
    """QLoRA for `prefalign rm`: LoRA on the 4-bit body, the fresh score head unquantized and trained in full; the
    adapter reloads onto a full-precision classifier, and --merge_adapter merges into the dequantized body."""
    from transformers import AutoModelForSequenceClassification

    from prefalign.config import RMConfig
    from prefalign.stages.rm import load_reward_model

    model, new_head = load_reward_model(RMConfig(model_name_or_path=str(model64_dir), load_in_4bit=True, lora_r=4),
                                        pad_token_id=0)
    base = model.get_base_model()
    assert new_head and isinstance(base.model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear4bit)
    head = base.score.modules_to_save["default"]
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32 and head.weight.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)

    out = tmp_path / "rm"
    assert run_cli("rm", model64_dir, pairs_file, out, "--max_steps", 3, "--per_device_train_batch_size", 2,
                   "--load_in_4bit", "--lora_r", 4, "--learning_rate", 1e-2, "--merge_adapter") == 0
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)
    def classifier(quantized: bool):
        load = _load_4bit if quantized else AutoModelForSequenceClassification.from_pretrained
        kwargs = {"auto_class": AutoModelForSequenceClassification} if quantized else {}
        return PeftModel.from_pretrained(load(model64_dir, num_labels=1, **kwargs), str(out)).eval()

    on_4bit, on_fp32 = classifier(True), classifier(False)
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    assert "quantization_config" not in json.loads((out / "merged" / "config.json").read_text())
    assert type(merged.model.layers[0].mlp.up_proj) is torch.nn.Linear
    trained_head = on_fp32.get_base_model().score.modules_to_save["default"].weight
    assert torch.equal(merged.score.weight, trained_head)  # the trained head, in both reloads
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, on_4bit(IDS).logits, atol=1e-4, rtol=0)
        assert torch.isfinite(on_fp32(IDS).logits).all()

def test_a_gguf_base_in_4_bits(model64_dir, tmp_path):
    """transformers cannot quantize a GGUF file with bitsandbytes: its dequantized weights go through a temporary
    Hugging Face directory, and the model still names the .gguf file (what a saved adapter records as its base)."""
    pytest.importorskip("gguf")
    path = write_gguf(AutoModelForCausalLM.from_pretrained(model64_dir), AutoTokenizer.from_pretrained(model64_dir),
                      tmp_path / "llama64.gguf", "Q8_0")
    model = load_policy(ModelArgs(model_name_or_path=str(path), load_in_4bit=True, lora_r=4))
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 14
    assert model.dequantized_from == "GGUF Q8_0 (15 Q8_0, 5 F32 tensors), dequantized and requantized to 4-bit nf4"
    assert model.get_base_model().name_or_path == str(path)
    assert model.peft_config["default"].base_model_name_or_path == str(path)


def test_qlora_errors_are_one_line(model64_dir, pairs_file, tmp_path, monkeypatch, capsys):
    assert run_cli("dpo", model64_dir, pairs_file, tmp_path / "a", "--load_in_4bit", "--bnb_4bit_quant_type",
                   "int4") == 2
    assert capsys.readouterr().err == "prefalign dpo: error: --bnb_4bit_quant_type: must be nf4 or fp4, got 'int4'\n"
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed: `import bitsandbytes` fails
    assert run_cli("dpo", model64_dir, pairs_file, tmp_path / "b", "--load_in_4bit") == 2
    assert capsys.readouterr().err == ("prefalign dpo: error: --load_in_4bit: 4-bit loading needs bitsandbytes: "
                                       "pip install 'prefalign[qlora]'\n")
