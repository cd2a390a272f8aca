"""Chat templates: the tokenizer's own by default, a built-in by name, or a .jinja file; and --prompt_template,
the format string for string prompts (`fill_prompt_template`).

Built-ins other than ChatML are produced by `format_template` from LLM-Dojo-style format strings, so a model
family missing here is one call away. They render message content verbatim (no trimming) and use the
family's literal special-token strings; prompts are encoded with add_special_tokens=False, so a BOS written
by the template is never doubled.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prefalign.errors import PrefalignError

# ChatML as Qwen2 uses it. The generation prompt opens the assistant turn; every turn ends with <|im_end|>\n.
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_PLACEHOLDER = re.compile(r"(\{content\}|\{role\}|\{bos_token\}|\{eos_token\})")


def _jinja_text(fmt: str) -> str:
    """Jinja that emits `fmt` with {content}/{role}/{bos_token}/{eos_token} filled from the loop's message."""
    parts = []
    for piece in _PLACEHOLDER.split(fmt):
        if not piece:
            continue
        if piece == "{content}":
            parts.append("message['content']")
        elif piece == "{role}":
            parts.append("message['role']")
        elif piece in ("{bos_token}", "{eos_token}"):
            name = piece[1:-1]
            parts.append(f"({name} if {name} is defined and {name} else '')")
        else:
            parts.append(json.dumps(piece))  # a JSON string literal is a valid Jinja string literal
    return "{{- " + " + ".join(parts or ["''"]) + " }}"


def format_template(
    system_format: str | None,
    user_format: str,
    assistant_format: str,
    *,
    tool_format: str | None = None,
    prefix: str = "",
    generation_prompt: str | None = None,
    system_separator: str = "\n\n",
) -> str:
    """Build a Jinja chat template from format strings holding `{content}` (and optionally `{role}`,
    `{bos_token}`, `{eos_token}`), as LLM-Dojo writes them, e.g. user_format="<|user|>\\n{content}<|end|>\\n".

    system_format=None folds a system message into the first user turn (content + system_separator + user
    content), as Gemma and Mistral do. `prefix` is emitted once at the start (a BOS string). The generation
    prompt defaults to the part of assistant_format before `{content}`; LLM-Dojo-style formats that put the
    assistant header in user_format simply get an empty one. A tool message with no tool_format is an error
    raised while rendering.
    """
    for name, fmt in (("user_format", user_format), ("assistant_format", assistant_format)):
        if "{content}" not in fmt:
            raise PrefalignError(f"{name} must contain '{{content}}', got {fmt!r}", where="--chat_template")
    if generation_prompt is None:
        generation_prompt = assistant_format.split("{content}")[0]
    fold_system = system_format is None
    out = [_jinja_text(prefix) if prefix else ""]
    if fold_system:
        out.append(
            "{%- set ns = namespace(system='') %}"
            "{%- if messages and messages[0]['role'] == 'system' %}"
            f"{{%- set ns.system = messages[0]['content'] + {json.dumps(system_separator)} %}}"
            "{%- set messages = messages[1:] %}{%- endif %}"
        )
    out.append("{%- for message in messages %}")
    if fold_system:
        out.append(
            "{%- if message['role'] == 'user' and ns.system %}"
            "{%- set message = {'role': 'user', 'content': ns.system + message['content']} %}"
            "{%- set ns.system = '' %}{%- endif %}"
        )
    branches = [("user", user_format), ("assistant", assistant_format)]
    if system_format is not None:
        branches.insert(0, ("system", system_format))
    if tool_format is not None:
        branches.append(("tool", tool_format))
    for i, (role, fmt) in enumerate(branches):
        out.append(f"{{%- {'if' if i == 0 else 'elif'} message['role'] == '{role}' %}}{_jinja_text(fmt)}")
    out.append(
        "{%- else %}{{- raise_exception('this chat template cannot render role ' + message['role']) }}"
        "{%- endif %}{%- endfor %}"
    )
    if fold_system:  # a system message with no user turn after it must not vanish silently
        out.append("{%- if ns.system %}{{- raise_exception('this chat template folds the system message into "
                   "the first user turn, and there is none') }}{%- endif %}")
    out.append(f"{{%- if add_generation_prompt %}}{_jinja_text(generation_prompt)}{{%- endif %}}")
    return "".join(out)


LLAMA3 = format_template(
    "<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
    "<|start_header_id|>assistant<|end_header_id|>\n\n{content}<|eot_id|>",
    tool_format="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>",
    prefix="<|begin_of_text|>",
)
# Mistral instruct (v0.1-v0.3 style): no system role, no generation prompt: the prompt ends with [/INST].
MISTRAL = format_template(None, "[INST] {content} [/INST]", "{content}</s>", prefix="<s>")
GEMMA = format_template(
    None,
    "<start_of_turn>user\n{content}<end_of_turn>\n",
    "<start_of_turn>model\n{content}<end_of_turn>\n",
    prefix="<bos>",
)
PHI3 = format_template(
    "<|system|>\n{content}<|end|>\n", "<|user|>\n{content}<|end|>\n", "<|assistant|>\n{content}<|end|>\n"
)
# DeepSeek V3 / R1 chat: the system text stands bare after BOS.
DEEPSEEK = format_template(
    "{content}",
    "<｜User｜>{content}",
    "<｜Assistant｜>{content}<｜end▁of▁sentence｜>",
    prefix="<｜begin▁of▁sentence｜>",
)
# Plain "role: content" lines for base models without a chat format; the answer ends with the tokenizer's EOS
# so that the model learns to stop. The generation prompt stops before the space so the answer's first token
# keeps its leading space, as a BPE tokenizer writes it.
PLAIN = format_template(
    "system: {content}\n", "user: {content}\n", "assistant: {content}{eos_token}\n",
    tool_format="tool: {content}\n", generation_prompt="assistant:",
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": CHATML,
    "llama3": LLAMA3,
    "mistral": MISTRAL,
    "gemma": GEMMA,
    "phi3": PHI3,
    "deepseek": DEEPSEEK,
    "plain": PLAIN,
}


def resolve_chat_template(tokenizer: Any, chat_template: str | None) -> None:
    """Set `tokenizer.chat_template`: None keeps the tokenizer's own, a built-in name, or a path to a Jinja file."""
    if chat_template is None:
        return
    if chat_template in BUILTIN_TEMPLATES:
        tokenizer.chat_template = BUILTIN_TEMPLATES[chat_template]
        return
    path = Path(chat_template).expanduser()
    if path.is_file():
        try:
            tokenizer.chat_template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PrefalignError(f"cannot read chat template {path}: {e}", where="--chat_template") from e
        return
    if path.suffix == ".jinja" or "/" in chat_template or path.exists():
        raise PrefalignError(f"chat template file not found: {chat_template}", where="--chat_template")
    names = ", ".join(BUILTIN_TEMPLATES)
    raise PrefalignError(
        f"unknown chat template '{chat_template}' (built-ins: {names}; or a path to a .jinja file)",
        where="--chat_template")


def require_chat_template(tokenizer: Any, source: str = "") -> None:
    """Conversational data needs a template: say how to give one when the tokenizer has none."""
    if not getattr(tokenizer, "chat_template", None):
        names = ", ".join(BUILTIN_TEMPLATES)
        where = f" (first conversational row: {source})" if source else ""
        raise PrefalignError(
            f"the data is conversational but the tokenizer has no chat template{where}; pass one of {names} "
            "or a .jinja file", where="--chat_template")


_PROBE = "\x1fprefalign-probe\x1f"


_TAKES_PARTS: dict[str, bool] = {}  # chat template text -> whether it renders content parts


def _takes_parts(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders list-of-parts contents (else it only takes strings).
    Probed once per template: a string-only one fails on a list, or prints the list's repr."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if template not in _TAKES_PARTS:
        probe = [{"role": "user", "content": [{"type": "text", "text": _PROBE}]}]
        try:
            text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
            text = text if isinstance(text, str) else text[0]
            _TAKES_PARTS[template] = _PROBE in text and "'type'" not in text
        except Exception:  # any failure on a list content means: strings only
            _TAKES_PARTS[template] = False
    return _TAKES_PARTS[template]


def template_messages(tokenizer: Any, messages: list[dict[str, Any]], source: str = "") -> list[dict[str, Any]]:
    """`messages` as the template takes them. Contents that are strings pass unchanged. Content parts go to
    a template that renders parts with each image part reduced to `{"type": "image"}` (the template writes the
    placeholder, the processor puts the pixels there); a template that only takes strings gets the text parts
    joined with nothing between them, and an image part is an error, since such a template has no place for it."""
    if not any(isinstance(m.get("content"), list) for m in messages):
        return messages
    if _takes_parts(tokenizer):
        return [m if isinstance(m["content"], str) else
                {**m, "content": [p if p["type"] == "text" else {"type": "image"} for p in m["content"]]}
                for m in messages]
    if any(p["type"] == "image" for m in messages if isinstance(m["content"], list) for p in m["content"]):
        raise PrefalignError("the row has an image part, but the chat template renders only string contents; "
                             "use a vision-language model's processor template", where=source or "--chat_template")
    return [m if isinstance(m["content"], str) else
            {**m, "content": "".join(p["text"] for p in m["content"])} for m in messages]


def render(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool, source: str = "") -> str:
    """The template's text for `messages` (content parts handled by `template_messages`); template errors name
    the row they came from."""
    messages = template_messages(tokenizer, messages, source)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja errors, raise_exception() from a template: the row or template is at fault
        raise PrefalignError(f"chat template failed: {e}", where=source or "--chat_template") from e
    if not isinstance(text, str):  # some processors return a list for batched input
        text = text[0]
    return text


# {name} with an identifier inside: other braces (code, JSON such as {"a": 1}) are left alone
_PROMPT_FIELD = re.compile(r"\{(\w+)\}")


def fill_prompt_template(template: str, prompt: str, row: dict[str, Any], source: str) -> str:
    """--prompt_template with `{prompt}` replaced by the prompt and every other `{name}` by the row's column
    `name`; a placeholder that names no column is a one-line error."""
    if "{prompt}" not in template:
        raise PrefalignError("must contain '{prompt}'", where="--prompt_template")

    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name == "prompt":
            return prompt
        value = row.get(name)
        if value is None or isinstance(value, (list, dict)):
            present = ", ".join(sorted(k for k, v in row.items() if isinstance(v, (str, int, float)))) or "none"
            what = "is not a column" if value is None else "is not a text column"
            raise PrefalignError(f"placeholder {{{name}}} {what} of {source} (text columns: {present})",
                                 where="--prompt_template")
        return str(value)

    return _PROMPT_FIELD.sub(fill, template)


def prompt_template_warning(template: str | None) -> str | None:
    """A warning when --prompt_template holds a backslash followed by n: in a shell, "...\\n..." in double quotes
    passes those two characters, not a newline, and every prompt would carry them."""
    if template is None or "\\n" not in template:
        return None
    return ("--prompt_template contains a literal backslash-n (\\n), not a newline; in a shell write "
            "$'Question: {prompt}\\n\\nAnswer: ' (or put the template in a YAML --config file)")
