"""Image pairs through the real tiny VLMs: the padded layout (each prompt and image twice, TRL's) against the packed
shared-prompt layout (each image-bearing prompt and its image once per pair) and the packed two-document one.
Token log-probs and every gradient must agree to fp32 rounding, on a batch that mixes prompt lengths, a pair with two
images, and a text-only pair. Qwen2-VL exercises the 3-D (M-RoPE) positions, LLaVA 1-D positions with a CLIP tower."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, Idefics3Config, Idefics3ForConditionalGeneration

from helpers import make_image, write_jsonl
from prefalign.config import DPOConfig
from prefalign.data.load import load_pairs
from prefalign.data.tokenize import Truncation, tokenize_pairs
from prefalign.model.load import load_processing
from prefalign.model.logprobs import completion_logps
from prefalign.model.packed import supports_packing, uninstall_packed_attention
from prefalign.stages.dpo import collate_pairs, use_packing

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def user(*parts):
    return {"role": "user", "content": list(parts)}


def image(name):
    return {"type": "image", "image": name}


def text(t):
    return {"type": "text", "text": t}


@pytest.fixture(scope="module")
def mixed_rows(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    for i in range(4):
        make_image(10 + i, (64, 64) if i != 2 else (48, 32)).save(d / f"{i}.png")
    system = {"role": "system", "content": "you are a helpful assistant"}
    rows = [
        {"prompt": [system, user(image("0.png"), text("what is in this image"))],
         "chosen": [{"role": "assistant", "content": "it is a cat"}],
         "rejected": [{"role": "assistant", "content": "it is a dog and it is blue"}]},
        {"prompt": [user(text("compare"), image("1.png"), text("and"), image("2.png"))],
         "chosen": [{"role": "assistant", "content": "the first is red"}],
         "rejected": [{"role": "assistant", "content": "no"}]},
        {"prompt": [system, {"role": "user", "content": "what is two plus two"}],  # a text-only pair
         "chosen": [{"role": "assistant", "content": "four"}],
         "rejected": [{"role": "assistant", "content": "five"}]},
        {"prompt": [user(image("3.png"), text("how many are there in the sky"))],
         "chosen": [{"role": "assistant", "content": "there are two"}],
         "rejected": [{"role": "assistant", "content": "one"}]},
    ]
    return write_jsonl(d / "pairs.jsonl", rows)


def tokenized(model_dir, data):
    cfg = DPOConfig(model_name_or_path=str(model_dir), dataset_name=str(data))
    tokenizer, processor = load_processing(cfg)
    pairs, _ = tokenize_pairs(load_pairs(cfg)[0], tokenizer, Truncation.of(cfg), processor)
    return pairs, tokenizer.pad_token_id, processor


def logps_and_grads(model, batch):
    model.zero_grad()
    out = completion_logps(model, batch)
    weights = torch.linspace(0.5, 1.5, out.token_logps.shape[0])[:, None]  # a distinct weight per row
    (out.token_logps * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("family_dir", ["tiny_vlm_dir", "tiny_llava_dir"])
def test_packed_image_layouts_equal_padded(family_dir, mixed_rows, request):
    model_dir = request.getfixturevalue(family_dir)
    pairs, pad, processor = tokenized(model_dir, mixed_rows)
    assert [len(p.images) for p in pairs] == [1, 2, 0, 1]
    model = AutoModelForImageTextToText.from_pretrained(model_dir).train()
    assert supports_packing(model) == (True, "ok")
    seen = []
    tower = model.get_encoder(modality="image")
    tower.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[0]))

    padded, g_padded = logps_and_grads(model, collate_pairs(pairs, pad, processor=processor))
    for share_prompt in (True, False):
        batch = collate_pairs(pairs, pad, packed=True, share_prompt=share_prompt, processor=processor)
        packed, g_packed = logps_and_grads(model, batch)
        assert torch.equal(packed.mask, padded.mask)
        torch.testing.assert_close(packed.token_logps, padded.token_logps, rtol=0, atol=2e-6)
        assert g_packed.keys() == g_padded.keys() and any("vis" in n for n in g_packed)  # the tower learns too
        for name in g_padded:
            torch.testing.assert_close(g_packed[name], g_padded[name], rtol=1e-4, atol=1e-5, msg=name)
    uninstall_packed_attention(model)
    # vision tower inputs: padded 2 x 4 images, shared prompt 4 images, two documents 2 x 4 (per image rows/patches)
    assert seen[1] * 2 == seen[0] == seen[2]
    assert model.config.vision_config._attn_implementation == "sdpa"  # only the text model was switched


def test_images_reach_the_model(tiny_vlm_dir, mixed_rows, tmp_path):
    """Other pixels, same tokens: the log-probs change (TRL's trap: a dataset it does not see as vision trains on the
    placeholder tokens alone)."""
    pairs, pad, processor = tokenized(tiny_vlm_dir, mixed_rows)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir).eval()
    make_image(99).save(tmp_path / "0.png")
    other = list(pairs)
    other[0] = type(pairs[0])(**{**pairs[0].__dict__, "images": (type(pairs[0].images[0])(path=str(tmp_path / "0.png")),)})
    with torch.no_grad():
        a = completion_logps(model, collate_pairs(pairs[:1], pad, processor=processor)).token_logps
        b = completion_logps(model, collate_pairs(other[:1], pad, processor=processor)).token_logps
    assert (a - b).abs().max() > 1e-4


def test_unverified_multimodal_family_falls_back_with_a_notice(tiny_tokenizer):
    config = Idefics3Config(text_config=dict(model_type="llama", vocab_size=len(tiny_tokenizer), hidden_size=32,
                                             intermediate_size=64, num_hidden_layers=1, num_attention_heads=4),
                            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=32, patch_size=8),
                            image_token_id=3)
    model = Idefics3ForConditionalGeneration(config)
    ok, reason = supports_packing(model)
    assert not ok and "idefics3 is a multimodal family whose packed positions are not verified" in reason
    packed, notice = use_packing(DPOConfig(), [model])
    assert not packed and notice.startswith("padded: padding-free batches are not supported here (idefics3")
