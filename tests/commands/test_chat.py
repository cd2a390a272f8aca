"""`prefalign chat`: full models and LoRA adapters loaded by path, one-shot --prompt and the interactive loop.

Expected replies come from `prefalign.chat.generate_reply` (itself tested against hand-rolled argmax decoding in
test_chat.py) on models loaded independently of the command, so the command's loading is what is under test.
"""

from __future__ import annotations

import io

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from helpers import copy_without_chat_template
from prefalign.cli import main
from prefalign.commands.chat import run_chat
from prefalign.config import ChatConfig
from prefalign.errors import PrefalignError
from prefalign.model.load import load_model_for_inference
from prefalign.rollout.answers import generate_reply

GREEDY = {"temperature": 0.0, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    """A LoRA adapter with non-zero B (init_lora_weights=False), so that it really changes the model's output."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules="all-linear",
                                            init_lora_weights=False))
    d = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(d)  # no tokenizer saved: the command must fall back to the base model's
    return d


def _expected(model_dir, tokenizer, messages, adapter=None):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    return generate_reply(model.eval(), tokenizer, messages, **GREEDY)


def test_prompt_answers_once(tiny_model_dir, tiny_tokenizer):
    out = io.StringIO()
    history = run_chat(ChatConfig(model_name_or_path=str(tiny_model_dir), prompt="hello", system_prompt="Be brief.",
                                  **GREEDY), output=out)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    want = _expected(tiny_model_dir, tiny_tokenizer, messages)
    assert history == [*messages, {"role": "assistant", "content": want}]
    assert out.getvalue() == want + "\n"  # the streamed pieces add up to the reply


def test_lora_adapter_loads_by_path(tiny_model_dir, tiny_tokenizer, adapter_dir):
    model, tokenizer = load_model_for_inference(str(adapter_dir))
    assert isinstance(model, PeftModel) and not model.training
    assert tokenizer.get_vocab() == tiny_tokenizer.get_vocab()  # the base model's tokenizer
    messages = [{"role": "user", "content": "hi there"}]
    with_adapter = _expected(tiny_model_dir, tiny_tokenizer, messages, adapter_dir)
    without = _expected(tiny_model_dir, tiny_tokenizer, messages)
    assert with_adapter != without  # the adapter is applied, not silently dropped
    history = run_chat(ChatConfig(model_name_or_path=str(adapter_dir), prompt="hi there", **GREEDY),
                       output=io.StringIO())
    assert history[-1]["content"] == with_adapter


def test_interactive_keeps_history(tiny_model_dir, tiny_tokenizer):
    lines = iter(["first question", "", "second question", "/exit"])
    out = io.StringIO()
    history = run_chat(ChatConfig(model_name_or_path=str(tiny_model_dir), **GREEDY), input_fn=lambda _: next(lines),
                       output=out)
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    # the second reply saw the first exchange
    assert history[3]["content"] == _expected(tiny_model_dir, tiny_tokenizer, history[:3])
    assert out.getvalue().startswith("Commands: /help list these commands, /reset")


def test_errors(tmp_path, tiny_model_dir, capsys):
    with pytest.raises(PrefalignError, match="--temperature"):
        run_chat(ChatConfig(model_name_or_path=str(tiny_model_dir), temperature=-1.0, prompt="x"))
    assert main(["chat", "--model_name_or_path", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "no such model directory" in capsys.readouterr().err
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(PrefalignError, match="names no base model"):
        load_model_for_inference(str(tmp_path))


def test_cli_prompt(tiny_model_dir, tiny_tokenizer, capsys):
    assert main(["chat", "--model_name_or_path", str(tiny_model_dir), "--prompt", "hello", "--temperature", "0",
                 "--max_new_tokens", "8"]) == 0
    want = _expected(tiny_model_dir, tiny_tokenizer, [{"role": "user", "content": "hello"}])
    assert capsys.readouterr().out == want + "\n"


@pytest.fixture()
def no_template_dir(tiny_model_dir, tmp_path):
    """The tiny model with its tokenizer saved without a chat template (a base model)."""
    return copy_without_chat_template(tiny_model_dir, tmp_path / "base")


def test_chat_takes_the_template_flags_of_training(no_template_dir, tiny_model_dir, tiny_tokenizer, tmp_path,
                                                   capsys):
    args = ["chat", "--model_name_or_path", str(no_template_dir), "--prompt", "hello", "--temperature", "0",
            "--max_new_tokens", "8"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (
        "prefalign chat: error: --chat_template: the tokenizer has no chat template; pass --chat_template (a built-in "
        "name: chatml, llama3, mistral, gemma, phi3, deepseek, plain; or a .jinja file)")
    assert main([*args, "--chat_template", "chatml"]) == 0  # the tiny tokenizer's own template is ChatML
    want = _expected(tiny_model_dir, tiny_tokenizer, [{"role": "user", "content": "hello"}])
    assert capsys.readouterr().out == want + "\n"
    # a template that cannot render a system role: one line, as `prefalign dpo` gives, not the template's traceback
    jinja = tmp_path / "nosys.jinja"
    jinja.write_text("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                     "supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    assert main([*args, "--chat_template", str(jinja), "--system_prompt", "Be brief."]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["prefalign chat: error: --system_prompt: the chat template cannot render a system message (chat "
                   "template failed: System role not supported); drop --system_prompt or choose another "
                   "--chat_template"]
