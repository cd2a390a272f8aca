"""Reward functions for GRPO / RLOO, a reward-model scorer, and how several rewards combine into one.

The one signature (TRL's):

    fn(prompts: list, completions: list, **columns) -> list[float | None]

It is called with keyword arguments: `prompts` and `completions` are lists of the same length (one entry per
completion, the prompt repeated for each of its generations); a completion is a string, or for conversational
prompts a one-message list `[{"role": "assistant", "content": ...}]`. Every other dataset column arrives as a
keyword list aligned with them (`answer=[...]`), so a function should accept `**kwargs` for the ones it ignores.
Returning None for a completion means "this function does not apply here" (multi-task data): it is left out
of that completion's weighted sum instead of counting as 0. A function must return one value per completion;
returning something else, returning nan or inf, or raising stops the run with one line that names the function
(after the function's own traceback, when it raised).

Spec strings accepted by `load_reward_function` (the CLI's `--reward_funcs`):

    exact_match            1.0 when the completion equals the `answer` column (whitespace-normalised), else 0.0
    exact_match:number     1.0 when the last number in the completion equals the last number in `answer`
    regex:PATTERN          1.0 when PATTERN matches anywhere in the completion (re.DOTALL; anchor with ^...$)
    length:N               -|len(completion) - N| / N, characters; 0 at exactly N characters
    path/to/file.py:NAME   function NAME defined in that file
    package.module:NAME    function NAME importable from package.module
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from prefalign.data.templates import resolve_chat_template
from prefalign.data.tokenize import encode_raw, encode_texts
from prefalign.errors import PrefalignError, UserCodeError
from prefalign.model.checks import check_vocab
from prefalign.model.load import load_trained_score_model

logger = logging.getLogger(__name__)

RewardFunction = Callable[..., list]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def completion_text(completion: str | list[dict[str, Any]]) -> str:
    """The text of a completion: the string itself, or the content of a conversational completion's messages."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content", "")) for m in completion)


def _normalise(text: str) -> str:
    return " ".join(text.split())


def last_number(text: str) -> float | None:
    """The last number written in `text` ("1,234.5" -> 1234.5), or None when there is none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _answers(columns: dict[str, Any], name: str) -> list:
    if "answer" not in columns:
        raise PrefalignError(f"reward {name} compares against an 'answer' column, which the dataset lacks", "--reward_funcs")
    return columns["answer"]


def exact_match(prompts: list, completions: list, **columns: Any) -> list[float | None]:
    """1.0 when the completion equals the row's `answer` after collapsing whitespace; None where answer is None."""
    answers = _answers(columns, "exact_match")
    return [
        None if a is None else float(_normalise(completion_text(c)) == _normalise(str(a)))
        for c, a in zip(completions, answers)
    ]


def exact_match_number(prompts: list, completions: list, **columns: Any) -> list[float | None]:
    """1.0 when the last number in the completion equals the last number in `answer` (GSM8K's "#### 42" works)."""
    answers = _answers(columns, "exact_match:number")
    out: list[float | None] = []
    for c, a in zip(completions, answers):
        expected = None if a is None else last_number(str(a))
        if expected is None:
            out.append(None)
            continue
        got = last_number(completion_text(c))
        out.append(float(got is not None and math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-9)))
    return out


def regex_reward(pattern: str) -> RewardFunction:
    """A reward of 1.0 for completions in which `pattern` matches (re.search, DOTALL), else 0.0."""
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise PrefalignError(f"invalid regular expression {pattern!r}: {e}", "--reward_funcs") from None

    def regex_format(prompts: list, completions: list, **columns: Any) -> list[float | None]:
        return [float(compiled.search(completion_text(c)) is not None) for c in completions]

    return regex_format


def length_reward(target: int) -> RewardFunction:
    """A reward of -|characters - target| / target: 0 at the target length, -1 at 0 or 2 x target characters."""
    if target <= 0:
        raise PrefalignError(f"length target must be a positive number of characters, got {target}", "--reward_funcs")

    def length(prompts: list, completions: list, **columns: Any) -> list[float | None]:
        return [-abs(len(completion_text(c)) - target) / target for c in completions]

    return length


def _import_attribute(module_part: str, attr: str, spec: str) -> Any:
    if module_part.endswith(".py"):
        path = Path(module_part)
        if not path.is_file():
            raise PrefalignError(f"reward function file {module_part} does not exist", spec)
        mod_spec = importlib.util.spec_from_file_location(f"prefalign_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
        # registered before it runs, as `import` does: dataclasses (and pickling) look their module up there
        sys.modules[mod_spec.name] = module  # type: ignore[union-attr]
        try:
            mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as e:  # a syntax error or a failing import in the user's file: keep its traceback
            sys.modules.pop(mod_spec.name, None)  # type: ignore[union-attr]
            raise UserCodeError(f"cannot load {module_part}: {_first_line(e)}", spec) from e
    else:
        try:
            module = importlib.import_module(module_part)
        except ModuleNotFoundError as e:
            raise PrefalignError(f"cannot import module {module_part!r} ({e})", spec) from None
    if not hasattr(module, attr):
        raise PrefalignError(f"module {module_part!r} has no attribute {attr!r}", spec)
    return getattr(module, attr)


def load_reward_function(spec: str) -> RewardFunction:
    """Resolve one spec string (see the module docstring) to a reward function with a meaningful `__name__`."""
    head, sep, rest = spec.partition(":")
    if spec == "exact_match":
        return exact_match
    if head == "exact_match" and rest == "number":
        return exact_match_number
    if head == "regex" and sep:
        return regex_reward(rest)
    if head == "length" and sep:
        try:
            return length_reward(int(rest))
        except ValueError:
            raise PrefalignError(f"length:N needs an integer N, got {rest!r}", spec) from None
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise PrefalignError(
            "not a reward function spec; use exact_match, exact_match:number, regex:PATTERN, length:N, "
            "module:function or file.py:function", spec,
        )
    fn = _import_attribute(module_part, attr, spec)
    if not callable(fn):
        raise PrefalignError(f"{attr!r} in {module_part!r} is not callable", spec)
    return fn


def reward_function_name(fn: Callable[..., Any]) -> str:
    """The name used in metrics (`rewards/<name>/mean`): the function's `__name__`, or its class name."""
    return getattr(fn, "__name__", None) or type(fn).__name__


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _described(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} ({text[:60]}{'...' if len(text) > 60 else ''})"


def _checked_values(values: Any, n: int, where: str) -> list[float]:
    """One float per completion (None -> nan) from what a reward function returned, or a PrefalignError saying
    what it returned instead; nan and inf are refused (None is the way to say "does not apply")."""
    if values is None or isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise PrefalignError(f"returned {'None' if values is None else _described(values)} instead of a list of {n} "
                             "values (one number or None per completion)", where)
    values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
    if len(values) != n:
        raise PrefalignError(f"returned {len(values)} values for {n} completions", where)
    out: list[float] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
            continue
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise PrefalignError(f"returned a value that is neither a number nor None: completion {i} got "
                                 f"{_described(v)}", where) from None
    nan = sum(math.isnan(v) for v, raw in zip(out, values) if raw is not None)
    inf = sum(math.isinf(v) for v in out)
    if nan or inf:
        counts = " and ".join(f"{name} for {k}" for name, k in (("nan", nan), ("inf", inf)) if k)
        raise PrefalignError(f"returned {counts} of {n} completions; return a finite number, or None for a "
                             "completion the function does not score", where)
    return out


def compute_rewards(
    functions: Sequence[Callable[..., Any]], prompts: list, completions: list, columns: dict[str, list] | None = None,
    when: str = "",
) -> torch.Tensor:
    """Call every reward function; (F, N) float32 with None -> nan. A wrong return, nan or inf is a PrefalignError
    naming the function (and `when`, e.g. "at step 3"); a function that raises keeps its traceback (UserCodeError)."""
    columns = columns or {}
    rows = []
    for fn in functions:
        name = reward_function_name(fn)
        where = f"reward function {name}" + (f" {when}" if when else "")
        try:
            values = fn(prompts=prompts, completions=completions, **columns)
        except PrefalignError:
            raise
        except Exception as e:
            raise UserCodeError(f"raised {_first_line(e)}", where) from e
        rows.append(_checked_values(values, len(completions), where))
    return torch.tensor(rows, dtype=torch.float32).view(len(functions), len(completions))


def unscored_counts(per_function: torch.Tensor, names: Sequence[str]) -> str:
    """'exact_match: 16 None, judge: 16 None' for an (F, N) reward table (nan = None)."""
    return ", ".join(f"{name}: {int(torch.isnan(row).sum())} None" for name, row in zip(names, per_function))


def combine_rewards(
    per_function: torch.Tensor | Sequence[Sequence[float | None]],
    weights: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum over reward functions, skipping None/nan: (F, N) -> (N,), as TRL's nansum.

    Returns the rewards and metrics `rewards/<name>/mean` and `rewards/<name>/std` (nan-aware, per function).
    A completion for which every function returned None is unscorable: its reward is nan (not 0, which would
    bias its group's baseline), and the advantage functions in `losses.policy` give it advantage 0.
    """
    if not isinstance(per_function, torch.Tensor):
        per_function = torch.tensor([[math.nan if v is None else float(v) for v in row] for row in per_function])
    per_function = per_function.float()  # (F, N)
    n_funcs = per_function.size(0)
    w = torch.ones(n_funcs) if weights is None else torch.tensor(list(weights), dtype=torch.float32)
    if w.numel() != n_funcs:
        raise PrefalignError(f"{w.numel()} reward weights given for {n_funcs} reward functions", "--reward_weights")
    rewards = (per_function * w.to(per_function.device).unsqueeze(1)).nansum(dim=0)  # (N,)
    all_none = torch.isnan(per_function).all(dim=0)
    if all_none.any():
        rewards[all_none] = math.nan
        logger.warning("every reward function returned None for %d completion(s); they get no advantage", int(all_none.sum()))
    names = list(names) if names is not None else [f"reward_{i}" for i in range(n_funcs)]
    metrics: dict[str, float] = {}
    for name, row in zip(names, per_function):
        valid = row[~torch.isnan(row)]
        metrics[f"rewards/{name}/mean"] = valid.mean().item() if valid.numel() else math.nan
        metrics[f"rewards/{name}/std"] = valid.std().item() if valid.numel() > 1 else math.nan
    return rewards, metrics


class RewardModelScorer:
    """Scores prompt + completion texts with a sequence-classification model that has one label.

    Conversational rows go through the reward tokenizer's chat template (prompt messages + completion
    messages); text rows are concatenated as prompt + completion. The score is logit 0 at the last non-padding
    token. Usable as a reward function: `scorer(prompts=..., completions=...)`.
    """

    def __init__(
        self,
        model_path: str | Path | torch.nn.Module,
        tokenizer: Any = None,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        chat_template: str | None = None,
    ) -> None:
        flag = "--reward_model_name_or_path"
        self.model = (model_path if isinstance(model_path, torch.nn.Module)
                      else load_trained_score_model(str(model_path), flag))
        if dtype is not None:
            self.model.to(dtype)
        if tokenizer is None:
            # never trust_remote_code: the reward model's directory is data, not code
            tokenizer = AutoTokenizer.from_pretrained(self.model.config._name_or_path, trust_remote_code=False)
        check_vocab(self.model, tokenizer, flag)
        self.tokenizer = tokenizer
        resolve_chat_template(self.tokenizer, chat_template)  # --reward_chat_template (a built-in or .jinja)
        if self.tokenizer.pad_token_id is None:
            # the head pools the last token before the first pad; an EOS standing in for pad would end it early
            raise PrefalignError("the reward tokenizer has no pad token", flag)
        if self.model.config.pad_token_id is None:
            # the classification head finds the last real token through pad_token_id
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        self.batch_size, self.max_length = batch_size, max_length
        self.__name__ = Path(str(getattr(self.model.config, "_name_or_path", "reward_model")) or "reward_model").name

    def require_chat_template(self, conversational: bool) -> None:
        """Conversational prompts are rendered with the reward tokenizer's template: refuse before the first rollout
        when it has none (rather than fail inside one)."""
        if conversational and not getattr(self.tokenizer, "chat_template", None):
            raise PrefalignError("the reward model's tokenizer has no chat template and the prompts are "
                                 "conversational; pass the template it was trained with (a built-in name or a "
                                 ".jinja file)", "--reward_chat_template")

    def same_tokenizer_as(self, tokenizer: Any) -> bool:
        """Whether `tokenizer` (the policy's) gives the reward model the same ids and template as its own."""
        return (self.tokenizer.get_vocab() == tokenizer.get_vocab()
                and getattr(self.tokenizer, "chat_template", None) == getattr(tokenizer, "chat_template", None))

    def texts(self, prompts: list, completions: list) -> list[str]:
        out = []
        for p, c in zip(prompts, completions):
            if isinstance(p, str):
                out.append(p + completion_text(c))
            else:
                out.append(self.tokenizer.apply_chat_template(list(p) + list(c), tokenize=False))
        return out

    def token_ids(self, prompts: list, completions: list) -> list[list[int]]:
        """Ids exactly as `prefalign rm` trained on them (data.tokenize.encode_pairs): a conversation rendered whole;
        a text prompt + completion by the raw-text rule (the tokenizer's default special tokens, EOS at the end)."""
        texts = self.texts(prompts, completions)
        raw = [i for i, p in enumerate(prompts) if isinstance(p, str)]
        chat = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        out: list[list[int]] = [[] for _ in prompts]
        for i, ids in zip(chat, encode_texts(self.tokenizer, [texts[i] for i in chat])):  # one batched call each
            out[i] = ids
        encoded = encode_raw(self.tokenizer, [prompts[i] for i in raw], [completion_text(completions[i]) for i in raw])
        for i, (_, ids) in zip(raw, encoded):
            out[i] = ids
        return [ids[: self.max_length] for ids in out] if self.max_length is not None else out

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list, **columns: Any) -> list[float]:
        ids = self.token_ids(prompts, completions)
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(ids), self.batch_size):
            rows = ids[start : start + self.batch_size]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)  # (b, T)
            mask = torch.zeros(len(rows), width, dtype=torch.long)  # right padding: the head reads the last real token
            for k, r in enumerate(rows):
                input_ids[k, : len(r)] = torch.tensor(r, dtype=torch.long)
                mask[k, : len(r)] = 1
            logits = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits  # (b, 1)
            scores.extend(logits[:, 0].float().tolist())
        return scores


def load_reward_functions(cfg: Any, device: Any, policy_tokenizer: Any = None, conversational: bool = False,
                          report: Callable[[str], Any] = print) -> list:
    """The rewards of an on-policy run: every --reward_funcs spec, then --reward_model_name_or_path's scorer. A
    reward model whose tokenizer differs from the policy's is said once (`report`): completions reach it as text
    and are re-tokenised with its own tokenizer."""
    fns = [load_reward_function(spec) for spec in cfg.reward_funcs]
    if cfg.reward_model_name_or_path:
        scorer = RewardModelScorer(cfg.reward_model_name_or_path, batch_size=cfg.per_device_train_batch_size,
                                   device=device, chat_template=getattr(cfg, "reward_chat_template", None))
        scorer.require_chat_template(conversational)
        if policy_tokenizer is not None and not scorer.same_tokenizer_as(policy_tokenizer):
            report(f"reward model {cfg.reward_model_name_or_path}: its tokenizer (or chat template) differs from the "
                   "policy's; completions are decoded to text and re-tokenised with the reward model's own")
        fns.append(scorer)
    if cfg.reward_weights is not None and len(cfg.reward_weights) != len(fns):
        raise PrefalignError(f"{len(cfg.reward_weights)} weights given for {len(fns)} rewards", "--reward_weights")
    return fns
