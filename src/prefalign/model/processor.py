"""The processor of a vision-language model (`AutoProcessor`), and the one case transformers cannot load alone.

Qwen2-VL-style processors (Qwen2-VL, Qwen2.5-VL, ...) require a video processor, and transformers' video
processors exist only with torchvision installed. Without it `AutoProcessor.from_pretrained` fails although
prefalign never feeds a video. `image_only` builds the same processor class minus its video processor from the
directory's image processor and tokenizer; it behaves exactly like the stock class on images and text, and saves
under the stock class name (so the saved directory loads with `AutoProcessor` wherever torchvision is present).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import transformers
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
from transformers.processing_utils import ProcessorMixin


def is_processor(obj: Any) -> bool:
    """Whether `obj` is a multimodal processor (rather than a bare tokenizer)."""
    return isinstance(obj, ProcessorMixin)


@cache
def image_only(base: type) -> type:
    """`base` (a processor class whose __init__ takes a video processor) without its video processor."""

    def __init__(self: Any, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any) -> None:
        # What the stock __init__ sets before ProcessorMixin.__init__, for the tokens it places.
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token)
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def to_dict(self: Any) -> dict[str, Any]:
        out = base.to_dict(self)
        out["processor_class"] = base.__name__  # saved as the stock class
        return out

    return type(f"{base.__name__}ImageOnly", (base,), {"__init__": __init__, "to_dict": to_dict})


def load_processor(name: str, trust_remote_code: bool = False) -> ProcessorMixin:
    """The model's processor; for a processor that needs torchvision only for videos, its image-only twin.
    Loading errors propagate (the caller names the flag)."""
    try:
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (ImportError, AttributeError, ValueError, TypeError, OSError) as e:
        if "video" not in str(e).lower() and "torchvision" not in str(e).lower():
            raise
        processor = _image_only_from(name, trust_remote_code)
    if not is_processor(processor):
        raise ValueError(f"{name} has no multimodal processor (AutoProcessor gave {type(processor).__name__})")
    return processor


def _image_only_from(name: str, trust_remote_code: bool) -> ProcessorMixin:
    image_processor = AutoImageProcessor.from_pretrained(name, trust_remote_code=trust_remote_code, backend="pil")
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    return image_only(_processor_class(name))(image_processor=image_processor, tokenizer=tokenizer,
                                               chat_template=getattr(tokenizer, "chat_template", None))


def _processor_class(name: str) -> type:
    """The stock processor class recorded for `name` (processor_config.json), else its model type's default."""
    recorded = ProcessorMixin.get_processor_dict(name)[0].get("processor_class")
    if not recorded:
        recorded = PROCESSOR_MAPPING_NAMES[AutoConfig.from_pretrained(name).model_type]
    return getattr(transformers, recorded)
