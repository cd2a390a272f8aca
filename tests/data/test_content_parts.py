"""Content parts in messages: text parts for any model, image parts in every form they are given, and the one-line
errors for what cannot work (URLs, missing or unreadable images, images without a processor)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

from helpers import conv, make_image, write_jsonl
from prefalign.config import DataArgs, DPOConfig, SFTConfig
from prefalign.data.formats import normalize_pair
from prefalign.data.inspect import inspect_dataset
from prefalign.data.load import load_pairs, load_rows, normalize_rows
from prefalign.data.sft import normalize_sft_row, tokenize_sft
from prefalign.data.templates import render
from prefalign.data.tokenize import Truncation, tokenize_pairs
from prefalign.errors import PrefalignError
from prefalign.model.load import load_processing


def pair_row(user_content, chosen="it is a cat"):
    return {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": user_content}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": "it is a dog"}]}


def image_part(value, key="image"):
    return {"type": "image", key: value}


def text_part(text):
    return {"type": "text", "text": text}


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def the_error(path) -> PrefalignError:
    with pytest.raises(PrefalignError) as e:
        normalize_rows(load_rows(str(path)), DataArgs(), str(path))
    assert "\n" not in str(e.value)
    return e.value


def test_text_parts_render_like_strings_for_a_string_only_template(tiny_tokenizer):
    """ChatML (the tiny tokenizer's) takes string contents only: the text parts are joined with nothing between."""
    parts = normalize_pair(pair_row([text_part("what is "), text_part("two plus two")]), "d.jsonl:1", DataArgs())
    plain = normalize_pair(pair_row("what is two plus two"), "d.jsonl:1", DataArgs())
    assert render(tiny_tokenizer, parts.prompt, True) == render(tiny_tokenizer, plain.prompt, True)
    limits = Truncation.of(DataArgs())
    a, _ = tokenize_pairs([parts], tiny_tokenizer, limits)
    b, _ = tokenize_pairs([plain], tiny_tokenizer, limits)
    assert (a[0].prompt_ids, a[0].chosen_ids) == (b[0].prompt_ids, b[0].chosen_ids)


def test_text_parts_work_in_sft(tiny_tokenizer):
    row = {"messages": [{"role": "user", "content": [text_part("hello")]}, {"role": "assistant", "content": "hi"}]}
    example = normalize_sft_row(row, "s.jsonl:1", SFTConfig())
    plain = normalize_sft_row({"messages": conv(("user", "hello"), ("assistant", "hi"))}, "s.jsonl:1", SFTConfig())
    assert tokenize_sft([example], tiny_tokenizer, SFTConfig())[0][0].input_ids == \
        tokenize_sft([plain], tiny_tokenizer, SFTConfig())[0][0].input_ids


def test_every_image_form_gives_the_same_pixels(tmp_path):
    image = make_image(3)
    image.save(tmp_path / "cat.png")
    data = png_bytes(image)
    b64 = base64.b64encode(data).decode()
    forms = [image_part("cat.png"), image_part(str(tmp_path / "cat.png")), image_part(f"file://{tmp_path}/cat.png"),
             image_part("data:image/png;base64," + b64), image_part(b64), image_part(b64, key="base64"),
             image_part(str(tmp_path / "cat.png"), key="path")]
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair_row([f, text_part("what")]) for f in forms])
    pairs = normalize_rows(load_rows(str(path)), DataArgs(), str(path))
    for p in pairs:
        ref = p.prompt[1]["content"][0]["image"]
        assert np.array_equal(np.asarray(ref.load()), np.asarray(image))
    # a datasets Image feature as to_list() gives it, and a PIL image as a hub dataset gives it
    for value in ({"bytes": data, "path": None}, {"bytes": None, "path": str(tmp_path / "cat.png")}, image):
        p = normalize_pair(pair_row([image_part(value), text_part("what")]), "hub[train]:row 0", DataArgs())
        assert np.array_equal(np.asarray(p.prompt[1]["content"][0]["image"].load()), np.asarray(image))


def test_parquet_with_an_image_feature(tmp_path):
    """A parquet file whose image parts are a datasets Image feature (all contents as parts: Arrow needs one type)."""
    from datasets import Dataset, Features, List, Value
    from datasets import Image as ImageFeature

    image = make_image(5)
    row = pair_row([image_part(image), text_part("what")])
    row["prompt"][0]["content"] = [text_part("be brief")]
    part = {"type": Value("string"), "text": Value("string"), "image": ImageFeature()}
    answer = List({"role": Value("string"), "content": Value("string")})
    features = Features({"prompt": List({"role": Value("string"), "content": List(part)}),
                         "chosen": answer, "rejected": answer})
    Dataset.from_list([row], features=features).to_parquet(str(tmp_path / "pairs.parquet"))
    pairs = normalize_rows(load_rows(str(tmp_path / "pairs.parquet")), DataArgs(), "pairs.parquet")
    ref = pairs[0].prompt[1]["content"][0]["image"]
    assert ref.data is not None and np.array_equal(np.asarray(ref.load()), np.asarray(image))
    assert pairs[0].prompt[1]["content"][1] == text_part("what")  # Arrow's "image": None dropped


@pytest.mark.parametrize(("part", "message"), [
    (image_part("https://example.com/cat.png"), "part 0: image URLs are not fetched (https://example.com/cat.png)"),
    (image_part("missing.png"), "part 0: no such image file: missing.png (relative paths are read from"),
    (image_part("broken.png"), "part 0 (broken.png): cannot read the image"),
    (image_part("!!not base64!!" * 4), "no such image file"),
    ({"type": "image"}, "part 0 is an image part without an image"),
    ({"type": "video", "video": "v.mp4"}, "part 0 has type 'video'; content parts are 'text' or 'image'"),
    ({"type": "text"}, "part 0 is a text part without a string 'text'"),
])
def test_bad_image_parts_are_one_line_errors_naming_file_line_and_image(tmp_path, part, message):
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair_row("fine"), pair_row([part, text_part("what")])])
    err = the_error(path)
    assert err.where == f"{path}:2"
    assert "'prompt' message 1" in err.reason and message in err.reason


def test_image_in_an_answer_is_refused(tmp_path):
    make_image(0).save(tmp_path / "a.png")
    row = pair_row("q")
    row["chosen"] = [{"role": "assistant", "content": [image_part("a.png")]}]
    err = the_error(write_jsonl(tmp_path / "pairs.jsonl", [row]))
    assert "the final assistant turn of 'chosen' holds an image" in err.reason


def test_image_parts_need_a_processor(tmp_path, tiny_tokenizer, vlm_pairs_file):
    pairs, _ = load_pairs(DataArgs(dataset_name=str(vlm_pairs_file)))
    with pytest.raises(PrefalignError, match="the row has an image part, but the chat template renders only string"):
        tokenize_pairs(pairs, tiny_tokenizer, Truncation.of(DataArgs()))  # ChatML: no place for an image
    row = {"messages": [pairs[0].prompt[1], {"role": "assistant", "content": "hi"}]}
    with pytest.raises(PrefalignError, match="supervised fine-tuning trains on text only"):
        tokenize_sft([normalize_sft_row(row, "s.jsonl:1", SFTConfig())], tiny_tokenizer, SFTConfig())


def test_image_pairs_get_their_image_tokens_and_keep_their_prompt(tiny_vlm_dir, vlm_pairs_file):
    tokenizer, processor = load_processing(DPOConfig(model_name_or_path=str(tiny_vlm_dir)))
    pairs, _ = load_pairs(DataArgs(dataset_name=str(vlm_pairs_file)))
    [p], _ = tokenize_pairs(pairs[:1], tokenizer, Truncation.of(DataArgs()), processor)
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert p.prompt_ids.count(pad) == 16 and pad not in p.chosen_ids  # 64x64, patch 8, merge 2
    assert tokenizer.decode(p.chosen_ids) == "it is a cat<|im_end|>\n"  # only the answer is scored
    assert len(p.images) == 1
    # image prompts are never cut: completions give way, and a prompt over the limits drops the pair
    n = len(p.prompt_ids)
    [cut], stats = tokenize_pairs(pairs[:1], tokenizer, Truncation(max_length=n + 5), processor)
    assert cut.prompt_ids == p.prompt_ids and len(cut.chosen_ids) == 5 and stats.completion_truncated == 1
    with pytest.raises(PrefalignError, match="no completion token left"):
        tokenize_pairs(pairs[:1], tokenizer, Truncation(max_length=n), processor)
    every, _ = tokenize_pairs(pairs, tokenizer, Truncation.of(DataArgs()), processor)
    shortest = min(len(q.prompt_ids) for q in every)
    kept, stats = tokenize_pairs(pairs, tokenizer, Truncation(max_prompt_length=shortest), processor)
    longer = sum(len(q.prompt_ids) > shortest for q in every)
    assert longer and stats.dropped["image_prompt"] == longer and len(kept) == len(pairs) - longer


def test_inspect_shows_where_images_sit(tiny_vlm_dir, vlm_pairs_file):
    tokenizer, processor = load_processing(DPOConfig(model_name_or_path=str(tiny_vlm_dir)))
    report = inspect_dataset(DataArgs(dataset_name=str(vlm_pairs_file)), tokenizer, color=False, processor=processor)
    assert "images: 4 in 4 of 4 pairs" in report
    assert "image: <image 1: 64×64, 16 tokens> from img0.png, prompt tokens" in report
    assert "<|im_start|>user\n<|vision_start|><image 1: 64×64, 16 tokens><|vision_end|>what is in this image" in report
    assert "[[it is a cat<|im_end|>\n]]" in report  # the scored tokens
    assert "<|image_pad|>×16=<image 1: 64×64, 16 tokens>" in report
    assert json.loads(vlm_pairs_file.read_text().splitlines()[0])["prompt"][1]["content"][0]["type"] == "image"
