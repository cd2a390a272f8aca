"""What a vision-language model's processor does to a pair: the image tokens it puts in the prompt
(`expand_prompt`, once, when the data is tokenized) and the image tensors of a batch (`image_inputs`, per batch).

The chat template writes one placeholder per image part (Qwen2-VL: `<|vision_start|><|image_pad|><|vision_end|>`,
LLaVA: `<image>`); the processor replaces it with as many image tokens as the image takes (16 for a 64x64 image
on the tiny test models) and makes the pixel tensors that fill them (`pixel_values`, plus `image_grid_thw` for
Qwen2-VL). Pixels are not kept between batches: a batch decodes its images again, so memory does not grow with
the data set. Both calls see the same decoded images (data.images), so the token count a prompt was tokenized
with is the one its pixels fill.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from prefalign.data.images import ImageRef
from prefalign.errors import PrefalignError


def expand_prompt(processor: Any, text: str, images: Sequence[ImageRef], source: str) -> list[int]:
    """Token ids of a rendered prompt with each image placeholder expanded to its image tokens."""
    pixels = [image.load() for image in images]
    placeholders = text.count(processor.image_token)
    if placeholders != len(pixels):
        raise PrefalignError(f"the chat template wrote {placeholders} image placeholders ({processor.image_token}) "
                             f"for {len(pixels)} images", where=source)
    try:
        encoded = processor(text=[text], images=[pixels] if pixels else None, add_special_tokens=False)
    except (ValueError, TypeError, RuntimeError) as e:
        raise PrefalignError(f"the processor cannot encode the prompt: {' '.join(str(e).split())[:300]}",
                             where=source) from None
    return list(encoded["input_ids"][0])


def image_inputs(processor: Any, images: Sequence[ImageRef], input_ids: Tensor | None = None) -> dict[str, Tensor]:
    """The model's image inputs for `images` (every image of the batch in the order their tokens appear in the
    rows); with `input_ids`, also `mm_token_type_ids` for processors that produce it (Qwen2-VL's 3-D positions
    read it), 1 on image tokens and 0 elsewhere. Empty when there are no images."""
    if not images:
        return {}
    decoded: dict[int, Any] = {}  # the padded layout repeats each image for the rejected rows: decode it once
    for image in images:
        if id(image) not in decoded:
            decoded[id(image)] = image.load()
    pixels = [decoded[id(image)] for image in images]
    out = processor.image_processor(images=pixels, return_tensors="pt")
    inputs = {k: v for k, v in out.items() if isinstance(v, Tensor)}
    if input_ids is not None and getattr(processor, "return_mm_token_type_ids", False):
        inputs["mm_token_type_ids"] = image_token_mask(processor, input_ids).long()
    return inputs


def image_token_mask(processor: Any, input_ids: Tensor) -> Tensor:
    """(.., T) bool: True at the processor's image tokens."""
    ids = [i for i in getattr(processor, "image_token_ids", [processor.image_token_id]) if i is not None]
    return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))


def image_runs(processor: Any, ids: Sequence[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of image tokens in `ids`: one run per image for the families we support."""
    image_ids = {i for i in getattr(processor, "image_token_ids", [processor.image_token_id]) if i is not None}
    runs: list[tuple[int, int]] = []
    for t, token in enumerate(ids):
        if token in image_ids:
            if runs and runs[-1][1] == t:
                runs[-1] = (runs[-1][0], t + 1)
            else:
                runs.append((t, t + 1))
    return runs
