"""Tiny offline models and tokenizers for tests: built on the spot, in seconds, no download."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch.profiler import ProfilerActivity, profile
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from prefalign.config.tools import ModelShape
from prefalign.data.templates import BUILTIN_TEMPLATES
from prefalign.data.tokenizer import train_bpe_tokenizer
from prefalign.model.init import init_model
from prefalign.model.processor import image_only

WORDS = " ".join([
    "the a an what is how why who when where which answer question user assistant system hello world",
    "good bad yes no please thank you sure here it capital of france paris number two three four five",
    "plus minus equals sum one zero cat dog sky blue red green i am can will do not help me with this",
]).split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]
    lines += [f"{a} + {b} = {a + b}" for a in range(20) for b in range(0, 20, 3)]
    lines += ["<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n"] * 5
    return lines


def build_tokenizer(out_dir: Path, vocab_size: int = 400):
    tok = train_bpe_tokenizer(corpus(), vocab_size=vocab_size)
    tok.save_pretrained(out_dir)
    return tok


def build_model(out_dir: Path, tokenizer, architecture: str = "qwen2", hidden_size: int = 32, seed: int = 0):
    shape = ModelShape(architecture=architecture, hidden_size=hidden_size, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = init_model(shape, tokenizer, seed=seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def conv(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in turns]


def run_cli(command: str, model_dir, data, out, *extra) -> int:
    """`prefalign COMMAND` in-process on a tiny model: quiet, every step logged, no trackers; `extra` flags win."""
    from prefalign.cli import main

    return main([command, "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out),
                 "--logging_steps", "1", "--disable_tqdm", "--report_to", "none", *map(str, extra)])


# ---------------------------------------------------------------- tiny vision-language models

# ChatML that renders string contents and content parts; an image part becomes the family's placeholder, which the
# processor expands to the image's tokens. It tests part['type'] only (Arrow gives text parts an "image": None).
VLM_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- 'IMAGE_PLACEHOLDER' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN_VL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
TEXT_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)


def build_vlm(out_dir: Path, family: str = "qwen2_vl", seed: int = 0):
    """A tiny random VLM of `family` (qwen2_vl or llava) and its processor, assembled offline from our BPE tokenizer
    and an image-processor config (PIL backend: no torchvision), saved in Hugging Face format. A 64x64 image takes
    16 tokens in both."""
    tok = train_bpe_tokenizer(corpus(), vocab_size=400)
    if family == "qwen2_vl":
        tok.add_tokens(QWEN_VL_TOKENS, special_tokens=True)
        ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_VL_TOKENS}
        tok.chat_template = VLM_TEMPLATE.replace("IMAGE_PLACEHOLDER", "<|vision_start|><|image_pad|><|vision_end|>")
        config = Qwen2VLConfig(
            text_config=dict(vocab_size=len(tok), **TEXT_SIZES, bos_token_id=None, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id,
                             # (t, h, w) sections sum to head_dim / 2 = 4
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}),
            vision_config=dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=8,
                               spatial_merge_size=2, temporal_patch_size=2),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=False)
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
        images = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16,
                                          max_pixels=64 * 64)
        processor = image_only(Qwen2VLProcessor)(image_processor=images, tokenizer=tok, chat_template=tok.chat_template)
    elif family == "llava":
        tok.add_tokens(["<image>"], special_tokens=True)
        tok.chat_template = VLM_TEMPLATE.replace("IMAGE_PLACEHOLDER", "<image>")
        config = LlavaConfig(
            text_config=dict(model_type="qwen2", vocab_size=len(tok), **TEXT_SIZES, bos_token_id=None,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
            vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16),
            image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
            vision_feature_select_strategy="default", image_seq_length=16, tie_word_embeddings=False)
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
        images = LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=tok.chat_template)
    else:
        raise ValueError(family)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return model, processor


def make_image(seed: int, size: tuple[int, int] = (64, 64)):
    """A reproducible RGB noise image."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), "RGB")


QUESTIONS = ["what is in this image", "describe the picture", "what colour is it", "how many are there"]
GOOD = ["it is a cat", "a red sky", "it is blue", "there are two"]
BAD = ["it is a dog", "no", "it is green", "there is one"]


def vlm_rows(image_dir: Path, n: int = 4) -> list[dict]:
    """Rows in the issue's layout: a system message, a user message with an image part then a text part, and
    chosen / rejected assistant answers. Images are PNG files next to the data, given by relative path."""
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        make_image(i).save(image_dir / f"img{i}.png")
        rows.append({
            "prompt": [{"role": "system", "content": "you are a helpful assistant"},
                       {"role": "user", "content": [{"type": "image", "image": f"{image_dir.name}/img{i}.png"},
                                                    {"type": "text", "text": QUESTIONS[i % 4]}]}],
            "chosen": [{"role": "assistant", "content": GOOD[i % 4]}],
            "rejected": [{"role": "assistant", "content": BAD[i % 4]}],
        })
    return rows


LLAMA3_BOS, LLAMA3_EOS, LLAMA3_EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"


def build_llama3_style_tokenizer(vocab_size: int = 400):
    """A byte-level BPE whose post-processor adds `<|begin_of_text|>` to every encoding, as Llama 3's does; EOS is
    `<|end_of_text|>` (the base model's), with Llama 3's chat template."""
    specials = [LLAMA3_BOS, LLAMA3_EOS, LLAMA3_EOT, "<|start_header_id|>", "<|end_header_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                          show_progress=False))
    bos_id = tok.token_to_id(LLAMA3_BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{LLAMA3_BOS} $A", pair=f"{LLAMA3_BOS} $A $B",
                                                       special_tokens=[(LLAMA3_BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=LLAMA3_BOS, eos_token=LLAMA3_EOS,
                                   pad_token=LLAMA3_EOS, additional_special_tokens=specials[2:])
    fast.chat_template = BUILTIN_TEMPLATES["llama3"]
    return fast


def _permute_for_gguf(weight, n_heads: int):
    """llama.cpp stores Llama's q/k projections with each head's rotary halves interleaved; transformers undoes it."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


GGUF_LLAMA_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_gguf(model, tokenizer, path: Path, qtype: str = "Q8_0", architecture: str = "llama") -> Path:
    """A GGUF file of a tiny Llama as llama.cpp's converter lays it out: metadata, a byte-level BPE tokenizer with its
    chat template, matrices quantized to `qtype` and vectors in F32 (tests of GGUF loading, no download)."""
    import gguf  # optional extra (prefalign[gguf]); only GGUF tests call this

    c, q = model.config, gguf.GGMLQuantizationType[qtype]
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "F32" else gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t in special else 1 for t, _ in vocab])  # 3 = control
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(tokenizer.convert_tokens_to_ids("<|im_start|>"))
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    def add(name: str, array) -> None:
        if array.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(array, q), raw_dtype=q)
        else:
            writer.add_tensor(name, array.astype(np.float32))

    add("token_embd.weight", state["model.embed_tokens.weight"])
    add("output_norm.weight", state["model.norm.weight"])
    if not c.tie_word_embeddings:
        add("output.weight", state["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        for hf_name, gguf_name in GGUF_LLAMA_NAMES.items():
            array = state[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                array = _permute_for_gguf(array, c.num_attention_heads)
            elif gguf_name == "attn_k":
                array = _permute_for_gguf(array, c.num_key_value_heads)
            add(f"blk.{i}.{gguf_name}.weight", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def peak_bytes(fn, *args) -> int:
    """Peak of live CPU tensor bytes allocated while `fn` runs (forward + backward).

    torch's profiler with `profile_memory=True` records every allocation and free of the CPU allocator
    against the op that did it (`self_cpu_memory_usage`, negative for frees; "[memory]" events are frees
    outside any op). Summing them in time order gives the live-bytes curve of this call; its maximum is the
    peak above whatever was allocated before.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args)
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def peak_bytes_bound(fn, *args) -> int:
    """An upper bound of the peak of live CPU tensor bytes while `fn` runs: as `peak_bytes`, but each op's
    allocations count from its start and its frees only from its end. The profiler gives an op's frees as one
    (negative) number, so when an op frees what the ops inside it allocated (a custom autograd Function's forward
    or backward), `peak_bytes`, which books every op at its start, books the frees before those allocations."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args)
    changes = []
    for event in prof.events():
        change = event.self_cpu_memory_usage
        changes.append((event.time_range.start if change > 0 else event.time_range.end, change))
    live = peak = 0
    for _, change in sorted(changes, key=lambda c: (c[0], -c[1])):  # at equal times, allocations first
        live += change
        peak = max(peak, live)
    return peak


def copy_without_chat_template(src: Path, dst: Path) -> Path:
    """A copy of the model directory `src` whose tokenizer has no chat template (as a base model's)."""
    import shutil

    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst
