"""Chat templates: the tokenizer's own by default, a built-in by name, or a .jinja file."""

from __future__ import annotations

# ChatML as Qwen2 uses it. The generation prompt opens the assistant turn; every turn ends with <|im_end|>\n.
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {"chatml": CHATML}
