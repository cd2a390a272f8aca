"""Pairs -> token ids: prompt once, each completion without the prompt, truncated to the length limits.

Conversational pairs (TRL's rule): prompt ids are the template's rendering of the prompt with the generation
prompt; a completion is every token the template adds after that, so with ChatML the scored tokens are the
answer, `<|im_end|>` and the newline after it. Scoring the end-of-turn token is what teaches the model to
stop; the newline comes with it because the template writes it, as TRL scores it too.
Where a template renders the prompt differently once an answer follows (so its tokens are not a prefix of the
full conversation's), the split falls where the two token sequences diverge, and a warning says so once.

Raw-text pairs (formats E/F), TRL 1.16's rule: the prompt and prompt + completion are each tokenized as the
tokenizer does by default (so a tokenizer whose post-processor adds BOS, as Llama 3's adds `<|begin_of_text|>`,
starts the prompt with it), EOS is appended to each completion that lacks it, and the completion is every token
after the prompt's. Where the prompt's last tokens merge with the completion's first (a prompt ending in a space:
"Answer: " + "4" tokenizes as "Answer:" + " 4"), the split falls where the token sequences diverge, as for
templates below, and the pair counts as a prefix mismatch.

Image pairs (content parts with images, data.content): rendered the same way, then the prompt is encoded by the
vision-language model's processor, which expands each image placeholder into the image's tokens (data.vision); the
completions follow every image, so they are split off as above. An image prompt is never cut: its completions give
way to --max_length, and a prompt over --max_prompt_length drops the pair.

Truncation, in this order: --max_prompt_length cuts the prompt (keep_end keeps its end, keep_start its start);
--max_completion_length cuts each completion's end; then --max_length bounds prompt + completion for each
completion. Under keep_end the prompt loses its oldest tokens first (keeping at least its last token, so the
first answer token has a context) and completions are cut only if that is not enough; under keep_start
completions lose their end and a prompt that fills max_length on its own leaves nothing to score.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prefalign.config import DataArgs, DatasetArgs, LengthArgs
from prefalign.config.checks import check_truncation
from prefalign.data.content import images_of
from prefalign.data.load import load_pairs
from prefalign.data.templates import render, require_chat_template
from prefalign.data.types import Pair, TokenizedPair
from prefalign.data.vision import expand_prompt
from prefalign.errors import PrefalignError

logger = logging.getLogger("prefalign.data")

DROP_REASONS = {
    "no_completion": "no completion token left (prompt fills --max_length={max_length})",
    "identical": "chosen and rejected are identical",
    "identical_after_truncation": "chosen and rejected identical after truncation",
    "image_prompt": "a prompt with images is longer than --max_prompt_length (image prompts are never cut)",
}
_ENCODE_BATCH = 1024
PREFIX_MISMATCH = ("the prompt's tokens are not a prefix of prompt + answer's (the chat template renders the prompt "
                   "differently once an answer follows, or the prompt's end merges with the answer's start)")


@dataclass(frozen=True)
class Truncation:
    """The length limits `truncate` applies, validated once (`of`)."""

    max_length: int | None = None
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    keep_end: bool = True  # --truncation_mode keep_end (else keep_start)

    @classmethod
    def of(cls, args: LengthArgs) -> Truncation:
        """The limits of `args`, or a PrefalignError naming the flag at fault."""
        check_truncation(args)
        return cls(args.max_length, args.max_prompt_length, args.max_completion_length,
                   args.truncation_mode == "keep_end")


@dataclass
class TokenizeStats:
    """What tokenization did to the pairs; every dropped pair is counted under its reason."""

    total: int = 0
    kept: int = 0
    prompt_truncated: int = 0
    completion_truncated: int = 0
    prefix_mismatch: int = 0  # conversational pairs whose prompt tokens were not a prefix of the full ones
    dropped: Counter = field(default_factory=Counter)
    max_length: int | None = None
    unit: str = "pairs"  # what was tokenized, as the summary names it

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def reason_text(self, reason: str) -> str:
        return DROP_REASONS.get(reason, reason).format(max_length=self.max_length)

    def summary(self) -> str:
        """One line, e.g. 'tokenized 12 pairs: kept 10, prompt truncated 3, ... dropped 2 (identical: 2)'."""
        parts = [f"tokenized {self.total} {self.unit}: kept {self.kept}",
                 f"prompt truncated {self.prompt_truncated}", f"completion truncated {self.completion_truncated}"]
        if self.prefix_mismatch:
            parts.append(f"prompt not a token prefix {self.prefix_mismatch}")
        dropped = f"dropped {self.num_dropped}"
        if self.dropped:
            dropped += " (" + ", ".join(f"{self.reason_text(r)}: {n}" for r, n in sorted(self.dropped.items())) + ")"
        return ", ".join([*parts, dropped])


@dataclass
class Encoded:
    """Untruncated ids of one pair, and whether the template broke the prompt-prefix property."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    prefix_mismatch: bool = False
    images: tuple = ()  # the prompt's ImageRefs; its image tokens are in prompt_ids


@dataclass
class Truncated:
    """Ids after truncation, what was cut, and the reason the pair is dropped (None if kept)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt_truncated: bool
    completion_truncated: bool
    drop_reason: str | None


def encode_texts(tokenizer: Any, texts: list[str], special_tokens: bool = False) -> list[list[int]]:
    """Token ids of each text. Without `special_tokens` nothing is added (a rendered chat template writes its own
    BOS); with it, the tokenizer's defaults apply (its post-processor's BOS), the rule for raw text."""
    out: list[list[int]] = []
    for i in range(0, len(texts), _ENCODE_BATCH):  # batched: the fast tokenizer works in parallel in Rust
        out.extend(tokenizer(texts[i:i + _ENCODE_BATCH], add_special_tokens=special_tokens)["input_ids"])
    return [list(ids) for ids in out]


def encode_raw(tokenizer: Any, prompts: list[str], completions: list[str]) -> list[tuple[list[int], list[int]]]:
    """TRL's raw-text rule, shared by DPO, KTO, reward models and SFT: (prompt ids, prompt + completion ids ending in
    EOS), both tokenized with the tokenizer's default special tokens; the completion starts at their common
    prefix (`common_prefix`)."""
    return [(prompt, fulls[0]) for prompt, fulls in encode_raw_group(tokenizer, prompts, [(c,) for c in completions])]


def encode_raw_group(tokenizer: Any, prompts: list[str], completions: list[Sequence[str]]
                     ) -> list[tuple[list[int], list[list[int]]]]:
    """`encode_raw` for several completions of each prompt (a pair's chosen and rejected): the prompt is tokenized
    once, each prompt + completion once."""
    texts = [t for p, cs in zip(prompts, completions) for t in (p, *(p + c for c in cs))]
    ids = iter(encode_texts(tokenizer, texts, special_tokens=True))
    eos = tokenizer.eos_token_id
    return [(next(ids), [with_eos(next(ids), eos) for _ in cs]) for cs in completions]


def encode_pairs(pairs: list[Pair], tokenizer: Any, processor: Any = None) -> list[Encoded]:
    """Token ids of every pair before truncation (conversational pairs via the chat template). A pair with images
    needs the vision-language model's `processor`: its prompt ids hold the image tokens the processor inserts."""
    chat = [p for p in pairs if p.is_conversational]
    if chat:
        require_chat_template(tokenizer, chat[0].source)
    texts: list[str] = []
    for p in chat:
        texts += [render(tokenizer, p.prompt, True, p.source),
                  render(tokenizer, p.prompt + p.chosen, False, p.source),
                  render(tokenizer, p.prompt + p.rejected, False, p.source)]
    chat_ids = iter(encode_texts(tokenizer, texts))
    prompt_texts = iter(texts[::3])
    raw = [p for p in pairs if not p.is_conversational]
    raw_ids = iter(encode_raw_group(tokenizer, [p.prompt for p in raw], [(p.chosen, p.rejected) for p in raw]))
    out = []
    for p in pairs:
        if p.is_conversational:
            enc = _split_completions(next(chat_ids), next(chat_ids), next(chat_ids))
            prompt_text = next(prompt_texts)
            images = tuple(images_of(p.prompt))
            if images:
                enc = _with_image_tokens(enc, processor, prompt_text, images, p.source)
            out.append(enc)
        else:
            prompt, (full_chosen, full_rejected) = next(raw_ids)
            out.append(_split_completions(prompt, full_chosen, full_rejected))
    return out


def _with_image_tokens(enc: Encoded, processor: Any, prompt_text: str, images: tuple, source: str) -> Encoded:
    """`enc` with its prompt re-encoded by the processor (each image placeholder expanded to its image tokens).
    The completions come after every image, so the split made on the unexpanded ids holds."""
    if processor is None:
        raise PrefalignError("the row has an image part, but there is no image processor: images need a "
                             "vision-language model (trained by `prefalign dpo`)", where=source)
    if enc.prefix_mismatch:
        raise PrefalignError("the chat template renders this image prompt differently once an answer follows; "
                             "image prompts need a template whose prompt is a prefix of the conversation", where=source)
    prompt = expand_prompt(processor, prompt_text, images, source)
    return Encoded(prompt, enc.chosen_ids, enc.rejected_ids, images=images)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def with_eos(ids: list[int], eos: int | None) -> list[int]:
    """`ids` ending in EOS (appended unless already there)."""
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _split_completions(prompt: list[int], full_chosen: list[int], full_rejected: list[int]) -> Encoded:
    """Completions are the tokens after the prompt; where the prompt is not a token prefix of the full
    sequences (a template, or tokens merging across the boundary), the split falls at the first position where
    either one diverges from it."""
    k = len(prompt)
    if full_chosen[:k] == prompt and full_rejected[:k] == prompt:
        return Encoded(prompt, full_chosen[k:], full_rejected[k:])
    for full in (full_chosen, full_rejected):
        k = min(k, common_prefix(prompt, full))
    return Encoded(full_chosen[:k], full_chosen[k:], full_rejected[k:], prefix_mismatch=True)


def cut(prompt: list[int], completions: list[list[int]], limits: Truncation) -> tuple[list[int], list[list[int]]]:
    """`prompt` and its `completions` (both answers of a pair, or one unpaired completion) cut to the limits (see the
    module docstring); the longest completion decides how much prompt a keep_end cut keeps."""
    keep_end, max_length = limits.keep_end, limits.max_length
    if limits.max_prompt_length is not None and len(prompt) > limits.max_prompt_length:
        n = limits.max_prompt_length
        prompt = prompt[len(prompt) - n:] if keep_end else prompt[:n]
    if limits.max_completion_length is not None:
        completions = [c[:limits.max_completion_length] for c in completions]
    if max_length is not None:
        longest = max(len(c) for c in completions)
        if keep_end and len(prompt) + longest > max_length:
            keep = max(1, max_length - longest)
            prompt = prompt[max(0, len(prompt) - keep):]
        room = max(0, max_length - len(prompt))
        prompt = prompt[:max_length]  # keep_start with a prompt longer than max_length
        completions = [c[:room] for c in completions]
    return prompt, completions


def truncate(enc: Encoded, limits: Truncation) -> Truncated:
    """Apply --max_prompt_length, --max_completion_length and --max_length (see the module docstring)."""
    if enc.images:
        return _truncate_image_pair(enc, limits)
    prompt, (chosen, rejected) = cut(enc.prompt_ids, [enc.chosen_ids, enc.rejected_ids], limits)
    return _truncated(enc, prompt, chosen, rejected)


def _truncate_image_pair(enc: Encoded, limits: Truncation) -> Truncated:
    """An image prompt is never cut (its image tokens must all stay, and so must whatever they attend to):
    completions lose their end to fit --max_length, and a prompt over --max_prompt_length drops the pair."""
    prompt, chosen, rejected = enc.prompt_ids, enc.chosen_ids, enc.rejected_ids
    if limits.max_prompt_length is not None and len(prompt) > limits.max_prompt_length:
        return Truncated(prompt, chosen, rejected, False, False, drop_reason="image_prompt")
    if limits.max_completion_length is not None:
        chosen, rejected = chosen[:limits.max_completion_length], rejected[:limits.max_completion_length]
    if limits.max_length is not None:
        room = max(0, limits.max_length - len(prompt))
        chosen, rejected = chosen[:room], rejected[:room]
    return _truncated(enc, prompt, chosen, rejected)


def _truncated(enc: Encoded, prompt: list[int], chosen: list[int], rejected: list[int]) -> Truncated:
    drop = None
    if not chosen or not rejected:
        drop = "no_completion"
    elif chosen == rejected:
        drop = "identical" if enc.chosen_ids == enc.rejected_ids else "identical_after_truncation"
    return Truncated(prompt, chosen, rejected,
                     prompt_truncated=len(prompt) < len(enc.prompt_ids),
                     completion_truncated=len(chosen) < len(enc.chosen_ids) or len(rejected) < len(enc.rejected_ids),
                     drop_reason=drop)


def tokenize_pairs(pairs: list[Pair], tokenizer: Any, limits: Truncation, processor: Any = None,
                   what: str | None = None) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Tokenize and truncate `pairs` (image pairs through `processor`); pairs left with nothing to learn from are
    dropped and counted. `what` names the split in errors and warnings ("evaluation set eval.jsonl")."""
    stats = TokenizeStats(total=len(pairs), max_length=limits.max_length)
    out: list[TokenizedPair] = []
    first_mismatch = None
    for pair, enc in zip(pairs, encode_pairs(pairs, tokenizer, processor)):
        t = truncate(enc, limits)
        if enc.prefix_mismatch:
            stats.prefix_mismatch += 1
            first_mismatch = first_mismatch or pair.source
        if t.drop_reason is not None:
            stats.dropped[t.drop_reason] += 1
            continue
        stats.prompt_truncated += t.prompt_truncated
        stats.completion_truncated += t.completion_truncated
        out.append(TokenizedPair(t.prompt_ids, t.chosen_ids, t.rejected_ids, pair.source, pair.margin, enc.images))
    stats.kept = len(out)
    if first_mismatch:
        logger.warning("%s: %s (%d pairs); the prompt/completion split falls where the tokens diverge",
                       first_mismatch, PREFIX_MISMATCH, stats.prefix_mismatch)
    if pairs and not out:
        why = ", ".join(f"{stats.reason_text(r)}: {n}" for r, n in stats.dropped.most_common())
        cut = {"no_completion", "identical_after_truncation"} & set(stats.dropped)
        hint = "; raise --max_length / --max_completion_length" if cut and what else ""
        where = what or ("--max_length" if "no_completion" in stats.dropped else None)
        raise PrefalignError(f"all {len(pairs)} pairs dropped: {why}{hint}", where=where)
    return out, stats


def split_names(args: DatasetArgs) -> tuple[str, str]:
    """How errors name the training and evaluation sets: 'training set FILE', 'evaluation set FILE'."""
    if args.eval_dataset_name:
        held_out = f"evaluation set {args.eval_dataset_name}"
    else:
        held_out = f"evaluation set (--eval_split_ratio {args.eval_split_ratio} of {args.dataset_name})"
    return f"training set {args.dataset_name}", held_out


def load_tokenized_pairs(args: DataArgs, tokenizer: Any, limits: Truncation, processor: Any = None
                         ) -> tuple[list[TokenizedPair], list[TokenizedPair] | None, dict[str, TokenizeStats]]:
    """(train, eval) token ids of the preference data in `args`, and what tokenization did to each split; image
    pairs go through a vision-language model's `processor`."""
    train_rows, eval_rows = load_pairs(args)
    train_name, eval_name = split_names(args)
    train, stats = tokenize_pairs(train_rows, tokenizer, limits, processor, train_name)
    if not eval_rows:
        return train, None, {"train": stats}
    eval_, eval_stats = tokenize_pairs(eval_rows, tokenizer, limits, processor, eval_name)
    return train, eval_, {"train": stats, "eval": eval_stats}
