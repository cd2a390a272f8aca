"""Built-in chat templates render exactly the family's format; resolution by name, file, or error."""

from __future__ import annotations

import copy

import pytest

from helpers import conv
from prefalign.data.templates import (
    BUILTIN_TEMPLATES,
    CHATML,
    format_template,
    render,
    require_chat_template,
    resolve_chat_template,
)
from prefalign.errors import PrefalignError

MESSAGES = conv(("system", "S"), ("user", "U1"), ("assistant", "A1"), ("user", "U2"), ("assistant", "A2"))

# Written out by hand from each family's published format (the tiny tokenizer's EOS is <|im_end|>, used by
# `plain`). Each entry: (full two-turn conversation, the same up to U2 with the generation prompt).
EXPECTED = {
    "chatml": (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n",
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\n",
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA1"
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nU2<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nU1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA1"
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nU2<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    # Mistral has no system role (folded into the first user turn) and no generation prompt
    "mistral": ("<s>[INST] S\n\nU1 [/INST]A1</s>[INST] U2 [/INST]A2</s>", "<s>[INST] S\n\nU1 [/INST]A1</s>[INST] U2 [/INST]"),
    "gemma": (
        "<bos><start_of_turn>user\nS\n\nU1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n"
        "<start_of_turn>user\nU2<end_of_turn>\n<start_of_turn>model\nA2<end_of_turn>\n",
        "<bos><start_of_turn>user\nS\n\nU1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n"
        "<start_of_turn>user\nU2<end_of_turn>\n<start_of_turn>model\n",
    ),
    "phi3": (
        "<|system|>\nS<|end|>\n<|user|>\nU1<|end|>\n<|assistant|>\nA1<|end|>\n<|user|>\nU2<|end|>\n"
        "<|assistant|>\nA2<|end|>\n",
        "<|system|>\nS<|end|>\n<|user|>\nU1<|end|>\n<|assistant|>\nA1<|end|>\n<|user|>\nU2<|end|>\n<|assistant|>\n",
    ),
    "deepseek": (
        "<｜begin▁of▁sentence｜>S<｜User｜>U1<｜Assistant｜>A1<｜end▁of▁sentence｜><｜User｜>U2<｜Assistant｜>A2"
        "<｜end▁of▁sentence｜>",
        "<｜begin▁of▁sentence｜>S<｜User｜>U1<｜Assistant｜>A1<｜end▁of▁sentence｜><｜User｜>U2<｜Assistant｜>",
    ),
    "plain": (
        "system: S\nuser: U1\nassistant: A1<|im_end|>\nuser: U2\nassistant: A2<|im_end|>\n",
        "system: S\nuser: U1\nassistant: A1<|im_end|>\nuser: U2\nassistant:",
    ),
}


@pytest.fixture
def tok(tiny_tokenizer):
    return copy.deepcopy(tiny_tokenizer)  # templates are set on it: keep the session fixture untouched


def test_every_builtin_is_tested():
    assert set(BUILTIN_TEMPLATES) == set(EXPECTED)
    assert BUILTIN_TEMPLATES["chatml"] == CHATML


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_renders_exactly(tok, name):
    resolve_chat_template(tok, name)
    full, with_generation_prompt = EXPECTED[name]
    assert render(tok, MESSAGES, False) == full
    assert render(tok, MESSAGES[:4], True) == with_generation_prompt
    # the property tokenization relies on: the prompt's text is a prefix of prompt + answer
    assert full.startswith(with_generation_prompt)


def test_none_keeps_the_tokenizers_own(tok):
    tok.chat_template = "{{ 'own' }}"
    resolve_chat_template(tok, None)
    assert tok.chat_template == "{{ 'own' }}"


def test_jinja_file(tok, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    resolve_chat_template(tok, str(path))
    assert render(tok, conv(("user", "a"), ("assistant", "b")), False) == "<user>a<assistant>b"


@pytest.mark.parametrize("value", ["missing.jinja", "some/dir/t.jinja"])
def test_missing_template_file_names_the_flag(tok, value):
    with pytest.raises(PrefalignError) as e:
        resolve_chat_template(tok, value)
    assert e.value.where == "--chat_template" and f"chat template file not found: {value}" in e.value.reason


def test_unknown_name_lists_builtins(tok):
    with pytest.raises(PrefalignError) as e:
        resolve_chat_template(tok, "vicuna")
    assert e.value.where == "--chat_template"
    assert "unknown chat template 'vicuna' (built-ins: chatml, llama3, mistral, gemma, phi3, deepseek, plain" in str(e.value)


def test_no_template_for_conversational_data_names_the_flag(tok):
    tok.chat_template = None
    with pytest.raises(PrefalignError) as e:
        require_chat_template(tok, "d.jsonl:3")
    assert e.value.where == "--chat_template" and "d.jsonl:3" in e.value.reason


def test_format_template_llm_dojo_style(tok):
    """LLM-Dojo's qwen format puts the assistant header inside user_format: the generation prompt is empty and
    the rendering is ChatML all the same."""
    tok.chat_template = format_template(
        "<|im_start|>system\n{content}<|im_end|>\n",
        "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
        "{content}<|im_end|>\n",
    )
    assert render(tok, MESSAGES, False) == EXPECTED["chatml"][0]
    assert render(tok, MESSAGES[:4], True) == EXPECTED["chatml"][1]


def test_format_template_escapes_quotes_and_braces(tok):
    tok.chat_template = format_template(None, "'{{U}}\" {content}\n", "\\A: {content}{eos_token}")
    assert render(tok, conv(("user", "x"), ("assistant", "y")), False) == "'{{U}}\" x\n\\A: y<|im_end|>"


def test_format_template_requires_content():
    with pytest.raises(PrefalignError, match="user_format must contain"):
        format_template(None, "<|user|>", "{content}")


def test_unrenderable_role_is_an_error_naming_the_row(tok):
    resolve_chat_template(tok, "gemma")
    with pytest.raises(PrefalignError) as e:
        render(tok, conv(("user", "a"), ("tool", "42"), ("assistant", "b")), False, "d.jsonl:9")
    assert e.value.where == "d.jsonl:9" and "cannot render role tool" in e.value.reason
    with pytest.raises(PrefalignError, match="folds the system message into the first user turn"):
        render(tok, conv(("system", "s"), ("assistant", "b")), False)
