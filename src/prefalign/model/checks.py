"""Refusals around loading a model, each one line naming the flag: a checkpoint that is not a causal LM, a tokenizer
larger than the embedding, LoRA target modules the model lacks, an adapter put on a base it was not trained on.
Each would otherwise be a deep traceback or, worse, a run that trains on something the user did not mean."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from prefalign.config import LoadArgs, ModelArgs
from prefalign.errors import PrefalignError

# Exceptions transformers/peft/huggingface_hub raise for a path or id that does not resolve to a model or config.
LOAD_ERRORS = (OSError, ValueError, KeyError)
_CAUSAL_LM_CLASSES = frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
_CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def architectures(name_or_path: str, trust_remote_code: bool = False) -> list[str]:
    """The model classes a checkpoint's config.json names (empty when it names none or cannot be read)."""
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except LOAD_ERRORS:
        return []  # the model load that follows reports the path
    return list(getattr(config, "architectures", None) or [])


def require_causal_lm(name_or_path: str, args: LoadArgs, flag: str) -> None:
    """Refuse a checkpoint saved as something other than a causal LM: transformers would load a reward model
    (…ForSequenceClassification) or a bare backbone as a causal LM with a freshly initialised LM head."""
    names = architectures(name_or_path, args.trust_remote_code)
    if names and not any(n in _CAUSAL_LM_CLASSES or n.endswith(_CAUSAL_LM_SUFFIXES) for n in names):
        kind = "a reward/classification model" if any("Classification" in n for n in names) else "not a causal LM"
        raise PrefalignError(f"{name_or_path} is a {names[0]} checkpoint ({kind}); a policy must be a causal "
                             "language model (…ForCausalLM)", flag)


def check_vocab(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, flag: str) -> None:
    """A tokenizer with more tokens than the model has embedding rows would fail mid-forward with an IndexError."""
    embedding = model.get_input_embeddings()
    rows = getattr(embedding, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise PrefalignError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows "
                             "(larger ids would index past it); use the model's own tokenizer", flag)


def check_lora_targets(model: torch.nn.Module, targets: list[str] | None, flag: str = "--lora_target_modules") -> None:
    """Every name in --lora_target_modules must match a module (peft matches a name or a dotted suffix); a typo
    would otherwise be a peft traceback, or, beside a correct name, a layer silently left without an adapter."""
    if not targets:
        return
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise PrefalignError(f"{type(model).__name__} has no module named {', '.join(map(repr, missing))}; its "
                             f"linear layers are {', '.join(linear)}", flag)


def check_adapter_base(args: ModelArgs) -> None:
    """An adapter trained on one base loads onto another whose shapes match, silently: refuse a --model_name_or_path
    other than the base its adapter_config.json names, unless --ignore_adapter_base."""
    adapter = getattr(args, "peft_adapter_path", None)
    config = Path(adapter or "").expanduser() / "adapter_config.json"
    if not adapter or getattr(args, "ignore_adapter_base", False) or not config.is_file():
        return
    recorded = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    given = args.model_name_or_path
    if not recorded or not given or same_model_path(recorded, given):
        return
    raise PrefalignError(f"was trained on {recorded} (its adapter_config.json), not --model_name_or_path {given}; "
                         "pass --ignore_adapter_base to load it on this base anyway", f"--peft_adapter_path "
                         f"{args.peft_adapter_path}")


def same_model_path(a: str, b: str) -> bool:
    """Whether two model paths or ids name the same model (resolved paths when both exist, else the strings)."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/") == b.rstrip("/")
