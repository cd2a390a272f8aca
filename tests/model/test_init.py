"""`prefalign init-model`: config from flags, saved in HF format with the tokenizer, no silent overwrite."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefalign.config import InitModelConfig
from prefalign.errors import PrefalignError
from prefalign.model.init import init_model_dir as init_model_command


def test_builds_and_saves_a_model_matching_the_tokenizer(tmp_path, tiny_tokenizer_dir):
    cfg = InitModelConfig(architecture="qwen2", hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128,
                          tokenizer=str(tiny_tokenizer_dir), output_dir=str(tmp_path / "m"))
    n = init_model_command(cfg)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    c = model.config
    assert (c.model_type, c.hidden_size, c.num_hidden_layers, c.num_key_value_heads, c.intermediate_size) == \
        ("qwen2", 32, 3, 2, 48)
    assert c.vocab_size == len(tok) and c.eos_token_id == tok.eos_token_id and c.pad_token_id == tok.pad_token_id
    assert n == sum(p.numel() for p in model.parameters())
    with pytest.raises(PrefalignError, match="already holds a model"):
        init_model_command(cfg)
    cfg.overwrite_output_dir, cfg.architecture = True, "llama"
    init_model_command(cfg)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").config.model_type == "llama"


@pytest.mark.parametrize(("change", "message"), [
    ({"architecture": "gpt9"}, "unknown architecture"),
    ({"hidden_size": 30}, "not divisible"),
    ({"num_key_value_heads": 3}, "not a multiple"),
    ({"tokenizer": "/nonexistent"}, "no such tokenizer directory"),
])
def test_bad_shapes_are_one_line_errors(tmp_path, tiny_tokenizer_dir, change, message):
    values = {"hidden_size": 32, "num_attention_heads": 4, "tokenizer": str(tiny_tokenizer_dir),
              "output_dir": str(tmp_path / "m"), **change}
    with pytest.raises(PrefalignError, match=message):
        init_model_command(InitModelConfig(**values))
