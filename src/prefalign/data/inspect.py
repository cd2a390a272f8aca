"""`prefalign data inspect`: see exactly what a preference run will train on.

For one row: where it came from, its format, the text the template renders, every token with the scored
(completion) tokens marked, and what truncation cut. For the whole file: how many rows are valid, length
percentiles before truncation, how many pairs truncation touches or drops and why, and warnings about the
things that make DPO misbehave (everything truncated, chosen systematically longer than rejected).

Unpaired feedback (rows with a label column, for KTO) gets the same report per example: label counts (with TRL's
warning when they are unbalanced for the default weights), prompt and completion lengths, truncation, and one row's
examples with their scored tokens (a preference pair in the same file is shown as its two unpaired examples).
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

from prefalign.config import PairData
from prefalign.data.formats import FORMAT_NAMES, detect_format, normalize_pair
from prefalign.data.load import Row, blank_prompt_rows, load_rows
from prefalign.data.templates import prompt_template_warning, resolve_chat_template
from prefalign.data.tokenize import (
    DROP_REASONS,
    PREFIX_MISMATCH,
    Encoded,
    Truncated,
    Truncation,
    cut,
    encode_pairs,
    truncate,
)
from prefalign.data.types import Pair, UnpairedExample
from prefalign.data.unpaired import balance_advice, encode_unpaired, label_summary, normalize_feedback
from prefalign.data.vision import image_runs
from prefalign.errors import PrefalignError

_GREEN, _RED, _DIM, _BOLD, _RESET = "\x1b[42;30m", "\x1b[41;30m", "\x1b[2m", "\x1b[1m", "\x1b[0m"


def inspect_dataset(args: PairData, tokenizer: Any, row: int | None = None, color: bool | None = None,
                    processor: Any = None) -> str:
    """A readable report on --dataset_name as `args` and `tokenizer` (and a vision-language model's `processor`)
    would tokenize it: the whole-file summary, then one row in detail (`row`, a 0-based index into the file's
    rows; default the first). Scored tokens are colored when `color` (default: stdout is a terminal), else
    wrapped in [[ ]]; each image's tokens are shown as one `<image k: W×H, N tokens>` where they sit."""
    if not args.dataset_name:
        raise PrefalignError("no data given", where="--dataset_name")
    limits = Truncation.of(args)
    color = sys.stdout.isatty() if color is None else color
    resolve_chat_template(tokenizer, args.chat_template)
    rows = load_rows(args.dataset_name, args.dataset_config, args.dataset_split)
    if not rows:
        raise PrefalignError("no rows", where=args.dataset_name)
    index = 0 if row is None else row
    if not 0 <= index < len(rows):
        raise PrefalignError(f"row {index} is out of range (the data has {len(rows)} rows, 0-{len(rows) - 1})",
                             where="--row")
    label_column = getattr(args, "label_column", None)
    if label_column and any(isinstance(r, dict) and r.get(label_column) is not None for r, _ in rows):
        return _inspect_unpaired(args, tokenizer, rows, index, limits, color)
    pairs: list[tuple[int, Pair]] = []
    errors: dict[int, PrefalignError] = {}
    formats: Counter = Counter()
    for i, (raw, source) in enumerate(rows):
        try:
            pairs.append((i, normalize_pair(raw, source, args)))
            formats[detect_format(raw, args)] += 1
        except PrefalignError as e:
            errors[i] = e
    encoded = encode_pairs([p for _, p in pairs], tokenizer, processor)
    truncated = [truncate(e, limits) for e in encoded]
    sections = [_summary(args, tokenizer, rows, pairs, errors, formats, encoded, truncated)]
    by_row = {i: k for k, (i, _) in enumerate(pairs)}
    if index in by_row:
        k = by_row[index]
        fmt = detect_format(rows[index][0], args)
        sections.append(_row_detail(index, fmt, pairs[k][1], encoded[k], truncated[k], tokenizer, args, color,
                                    processor))
    else:
        sections.append(f"== row {index}: invalid ==\n{errors[index]}")
    return "\n\n".join(sections)


def _percentiles(values: list[int]) -> list[int]:
    """p50, p90, p99 (nearest rank) and max."""
    s = sorted(values)
    if not s:
        return [0, 0, 0, 0]
    return [s[min(len(s) - 1, max(0, -(-q * len(s) // 100) - 1))] for q in (50, 90, 99)] + [s[-1]]


def _summary(args: PairData, tokenizer: Any, rows: list[Row], pairs: list[tuple[int, Pair]],
             errors: dict[int, PrefalignError], formats: Counter, encoded: list[Encoded],
             truncated: list[Truncated]) -> str:
    n_rows = len(rows)
    lines = [f"== {args.dataset_name}: {n_rows} rows, {len(pairs)} valid, {len(errors)} invalid =="]
    template_warning = prompt_template_warning(args.prompt_template)
    if template_warning:
        lines.append(f"warning: {template_warning}")
    blank = blank_prompt_rows(rows, args.prompt_column)
    if blank:
        lines.append(f"warning: {len(blank)} of {n_rows} rows have an empty or whitespace-only '{args.prompt_column}' "
                     f"column (first: {blank[0]})")
    if errors:
        lines.append(f"first invalid row: {next(iter(errors.values()))}")
    lines.append("formats: " + ", ".join(f"{f} {FORMAT_NAMES[f]}: {n}" for f, n in sorted(formats.items())))
    if any(p.is_conversational for _, p in pairs):
        lines.append(f"chat template: {args.chat_template or 'the tokenizer’s own'}")
    if not pairs:
        return "\n".join(lines)
    columns = {
        "prompt": [len(e.prompt_ids) for e in encoded],
        "chosen": [len(e.chosen_ids) for e in encoded],
        "rejected": [len(e.rejected_ids) for e in encoded],
        "longest": [len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) for e in encoded],
    }
    lines.append("tokens before truncation   p50    p90    p99    max")
    for name, values in columns.items():
        label = "prompt + longer answer" if name == "longest" else name
        lines.append(f"  {label:<24}" + "".join(f"{v:>7}" for v in _percentiles(values)))
    limits = (f"max_length={args.max_length}, max_prompt_length={args.max_prompt_length}, "
              f"max_completion_length={args.max_completion_length}, {args.truncation_mode}")
    kept = [t for t in truncated if t.drop_reason is None]
    lines.append(f"truncation ({limits}): prompt cut in {sum(t.prompt_truncated for t in kept)}, "
                 f"completion cut in {sum(t.completion_truncated for t in kept)} of {len(kept)} kept pairs")
    drops = Counter(t.drop_reason for t in truncated if t.drop_reason)
    text = ", ".join(f"{DROP_REASONS[r].format(max_length=args.max_length)}: {n}" for r, n in drops.most_common())
    lines.append(f"dropped: {sum(drops.values())}" + (f" ({text})" if text else ""))
    with_images = [e for e in encoded if e.images]
    if with_images:
        lines.append(f"images: {sum(len(e.images) for e in with_images)} in {len(with_images)} of {len(encoded)} "
                     "pairs (their tokens count in the prompt lengths above; image prompts are never cut)")
    lines += _warnings(pairs, encoded, truncated)
    return "\n".join(lines)


def _warnings(pairs: list[tuple[int, Pair]], encoded: list[Encoded], truncated: list[Truncated]) -> list[str]:
    out = []
    n = len(encoded)
    mismatch = sum(e.prefix_mismatch for e in encoded)
    if mismatch:
        out.append(f"warning: in {mismatch} pairs {PREFIX_MISMATCH}; the split falls where the tokens diverge")
    longer = sum(len(e.chosen_ids) > len(e.rejected_ids) for e in encoded)
    shorter = sum(len(e.chosen_ids) < len(e.rejected_ids) for e in encoded)
    if n >= 10 and max(longer, shorter) >= 0.7 * n:
        which = "longer" if longer > shorter else "shorter"
        out.append(f"warning: chosen is {which} than rejected in {max(longer, shorter)} of {n} pairs; DPO can learn "
                   "length instead of quality (consider --ld_alpha or --length_normalize)")
    cut = sum(t.completion_truncated for t in truncated if t.drop_reason is None)
    if n and cut >= 0.25 * n:
        out.append(f"warning: {cut} of {n} pairs lose the end of a completion (often its EOS), so the model "
                   "is not taught to stop there; consider a larger --max_length")
    margins = [p.margin for _, p in pairs if p.margin is not None]
    if margins:
        out.append(f"margin column: {len(margins)} rows, min {min(margins):g}, mean "
                   f"{sum(margins) / len(margins):g}, max {max(margins):g}")
    return out


def _piece(tokenizer: Any, token_id: int) -> str:
    return repr(tokenizer.decode([token_id]))[1:-1]  # escapes \n and other invisibles


def _row_detail(index: int, fmt: str, pair: Pair, enc: Encoded, t: Truncated, tokenizer: Any,
                args: PairData, color: bool, processor: Any = None) -> str:
    kind = "" if pair.is_conversational else f"; raw text: no chat template, {_bos_note(tokenizer, enc.prompt_ids)}EOS appended"
    lines = [f"== row {index}: {pair.source} (format {fmt}: {FORMAT_NAMES[fmt]}{kind}) =="]
    longest = len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids))
    lines.append(f"tokens: prompt {len(t.prompt_ids)}, chosen {len(t.chosen_ids)}, rejected {len(t.rejected_ids)}; "
                 f"longest sequence {longest} (max_length {args.max_length})")
    for name, before, after in (("prompt", enc.prompt_ids, t.prompt_ids), ("chosen", enc.chosen_ids, t.chosen_ids),
                                ("rejected", enc.rejected_ids, t.rejected_ids)):
        if len(after) < len(before):
            side = "start" if name == "prompt" and args.truncation_mode == "keep_end" else "end"
            lines.append(f"truncated: {name} {len(before)} -> {len(after)} tokens, cut at the {side}")
    if t.drop_reason:
        lines.append(f"DROPPED: {DROP_REASONS[t.drop_reason].format(max_length=args.max_length)}")
    if enc.prefix_mismatch:
        lines.append(f"note: {PREFIX_MISMATCH}")
    images = _image_spans(processor, t.prompt_ids, enc.images) if enc.images else []
    for k, (start, end, label) in enumerate(images, start=1):
        lines.append(f"image: {label} from {enc.images[k - 1].name}, prompt tokens {start}-{end - 1}")
    marks = "colored" if color else "in [[ ]]"
    prompt_text = _decode_with_images(tokenizer, t.prompt_ids, images)
    lines.append(f"-- text: prompt + chosen, scored tokens {marks} --")
    lines.append(_mark(prompt_text, tokenizer.decode(t.chosen_ids), _GREEN, color))
    lines.append(f"-- text: the same prompt + rejected, scored tokens {marks} --")
    lines.append(_mark("", tokenizer.decode(t.rejected_ids), _RED, color))
    lines.append("-- token id:piece --")
    prompt_ids = _ids(tokenizer, t.prompt_ids, images)
    lines.append("prompt:   " + (f"{_DIM}{prompt_ids}{_RESET}" if color else prompt_ids))
    lines.append("chosen:   " + _mark("", _ids(tokenizer, t.chosen_ids), _GREEN, color))
    lines.append("rejected: " + _mark("", _ids(tokenizer, t.rejected_ids), _RED, color))
    return "\n".join(lines)


def _bos_note(tokenizer: Any, prompt_ids: list[int]) -> str:
    """What the tokenizer's defaults put before raw text (TRL's rule: raw text is tokenized as the tokenizer does)."""
    bos = tokenizer.bos_token_id
    if bos is not None and prompt_ids[:1] == [bos]:
        return f"BOS {tokenizer.bos_token} added by the tokenizer, "
    return "no BOS (the tokenizer adds none), "


def _image_spans(processor: Any, ids: list[int], images: tuple) -> list[tuple[int, int, str]]:
    """(start, end, "<image k: W×H, N tokens>") of each image's run of tokens in `ids`."""
    spans = []
    for k, ((start, end), image) in enumerate(zip(image_runs(processor, ids), images), start=1):
        width, height = image.load().size
        spans.append((start, end, f"<image {k}: {width}×{height}, {end - start} tokens>"))
    return spans


def _decode_with_images(tokenizer: Any, ids: list[int], images: list[tuple[int, int, str]]) -> str:
    """The decoded text with each image's run of tokens shown as its label."""
    out, at = [], 0
    for start, end, label in images:
        out += [tokenizer.decode(ids[at:start]), label]
        at = end
    return "".join(out) + tokenizer.decode(ids[at:])


def _ids(tokenizer: Any, ids: list[int], images: list[tuple[int, int, str]] | None = None) -> str:
    runs = {start: (end, label) for start, end, label in images or []}
    out, t = [], 0
    while t < len(ids):
        if t in runs:
            end, label = runs[t]
            out.append(f"{ids[t]}:{_piece(tokenizer, ids[t])}×{end - t}={label}")
            t = end
        else:
            out.append(f"{ids[t]}:{_piece(tokenizer, ids[t])}")
            t += 1
    return " ".join(out)


def _mark(context: str, scored: str, paint: str, color: bool) -> str:
    if color:
        return (f"{_DIM}{context}{_RESET}" if context else "") + f"{paint}{scored}{_RESET}"
    return f"{context}[[{scored}]]"


# ---------------------------------------------------------------- unpaired feedback (KTO)


def _inspect_unpaired(args: PairData, tokenizer: Any, rows: list, index: int, limits: Truncation,
                      color: bool) -> str:
    examples: list[tuple[int, UnpairedExample]] = []
    errors: dict[int, PrefalignError] = {}
    for i, (raw, source) in enumerate(rows):
        try:
            examples += [(i, e) for e in normalize_feedback(raw, source, args)]
        except PrefalignError as e:
            errors[i] = e
    lines = [f"== {args.dataset_name}: {len(rows)} rows, {len(rows) - len(errors)} valid, {len(errors)} invalid =="]
    if errors:
        lines.append(f"first invalid row: {next(iter(errors.values()))}")
    valid = len({i for i, _ in examples})
    pairs = len(examples) - valid  # a pair row gives two examples
    lines.append(f"unpaired feedback: {valid - pairs} rows, preference pairs: {pairs} (2 examples each) -> "
                 f"{len(examples)} examples, {label_summary([e for _, e in examples])}")
    encoded = encode_unpaired([e for _, e in examples], tokenizer)
    cuts = [cut(p, [c], limits) for p, c, _ in encoded]
    if any(e.is_conversational for _, e in examples):
        lines.append(f"chat template: {args.chat_template or 'the tokenizer’s own'}")
    if examples:
        lines += _unpaired_summary(args, examples, encoded, cuts)
    detail = [k for k, (i, _) in enumerate(examples) if i == index]
    if not detail:
        return "\n".join(lines) + f"\n\n== row {index}: invalid ==\n{errors[index]}"
    sections = ["\n".join(lines)]
    for k in detail:
        sections.append(_example_detail(index, examples[k][1], encoded[k], cuts[k], tokenizer, color))
    return "\n\n".join(sections)


def _unpaired_summary(args: PairData, examples: list, encoded: list, cuts: list) -> list[str]:
    lines = ["tokens before truncation   p50    p90    p99    max"]
    for name, values in (("prompt", [len(p) for p, _, _ in encoded]), ("completion", [len(c) for _, c, _ in encoded]),
                         ("prompt + completion", [len(p) + len(c) for p, c, _ in encoded])):
        lines.append(f"  {name:<24}" + "".join(f"{v:>7}" for v in _percentiles(values)))
    kept = [(enc, (p, cs)) for enc, (p, cs) in zip(encoded, cuts) if cs[0]]
    limits = (f"max_length={args.max_length}, max_prompt_length={args.max_prompt_length}, "
              f"max_completion_length={args.max_completion_length}, {args.truncation_mode}")
    lines.append(f"truncation ({limits}): prompt cut in {sum(len(p) < len(e[0]) for e, (p, _) in kept)}, "
                 f"completion cut in {sum(len(cs[0]) < len(e[1]) for e, (_, cs) in kept)} of {len(kept)} kept examples")
    dropped = len(encoded) - len(kept)
    reason = DROP_REASONS["no_completion"].format(max_length=args.max_length)
    lines.append(f"dropped: {dropped}" + (f" ({reason}: {dropped})" if dropped else ""))
    mismatch = sum(m for _, _, m in encoded)
    if mismatch:
        lines.append(f"warning: in {mismatch} examples {PREFIX_MISMATCH}; the split falls where the tokens diverge")
    desirable = sum(e.label for _, e in examples)
    advice = balance_advice(desirable, len(examples) - desirable)
    if advice:
        lines.append(f"warning: {advice}")
    return lines


def _example_detail(index: int, example: UnpairedExample, enc: tuple, kept: tuple, tokenizer: Any,
                    color: bool) -> str:
    """One example of row `index`: label, lengths, what truncation cut, the text with its scored tokens marked."""
    label = "desirable" if example.label else "undesirable"
    (prompt, completion, mismatch), (kept_prompt, (kept_completion,)) = enc, kept
    kind = ("" if example.is_conversational
            else f"; raw text: no chat template, {_bos_note(tokenizer, prompt)}EOS appended")
    lines = [f"== row {index}: {example.source} ({label}{kind}) ==",
             f"tokens: prompt {len(kept_prompt)}, completion {len(kept_completion)}"]
    for name, before, after in (("prompt", prompt, kept_prompt), ("completion", completion, kept_completion)):
        if len(after) < len(before):
            lines.append(f"truncated: {name} {len(before)} -> {len(after)} tokens")
    if not kept_completion:
        lines.append("DROPPED: no completion token left (the prompt fills --max_length)")
    if mismatch:
        lines.append(f"note: {PREFIX_MISMATCH}")
    paint = _GREEN if example.label else _RED
    lines.append(f"-- text: prompt + completion, scored tokens {'colored' if color else 'in [[ ]]'} --")
    lines.append(_mark(tokenizer.decode(kept_prompt), tokenizer.decode(kept_completion), paint, color))
    lines.append("-- token id:piece --")
    lines.append("prompt:     " + _ids(tokenizer, kept_prompt))
    lines.append("completion: " + _mark("", _ids(tokenizer, kept_completion), paint, color))
    return "\n".join(lines)
