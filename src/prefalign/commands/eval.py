"""`prefalign eval`: how a policy compares with its reference.

* On preference pairs (`--dataset_name`): DPO's implicit-reward metrics, computed by DPO's own evaluation path
  (`stages.dpo.pair_metrics`: completion log-probs -> `preference_inputs` -> the loss), so the numbers mean exactly
  what `eval_rewards/*` mean in a DPO run: reward = beta x (policy - reference) sequence log-prob,
  `eval_rewards/accuracies` the fraction of pairs whose chosen reward is strictly above the rejected one.
* Win rate (`--judge module:function` or `--reward_model_name_or_path`): policy and reference each answer the
  pairs' prompts (greedy unless --temperature > 0); each answer gets a score and the policy wins a prompt when its
  score is higher (a tie counts one half). The judge has the reward-function signature
  `fn(prompts: list, completions: list[str], **columns) -> list[float | bool]` (prompts are strings or message
  lists; other dataset columns arrive as keyword lists); True/False count as 1/0.
* `--num_samples N`: the first N prompts with both answers side by side.

Without --ref_model_name_or_path the reference is the one the run used, as its prefalign_run.json records it (for
runs of older versions, what their prefalign_config.json implies): its --ref_model_name_or_path, the adapter it
continued from (--peft_adapter_path) on its base, or the model it started from (for a new LoRA adapter, its base
with the adapter disabled: the same weights, no second copy). Eval prints which reference it used.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from prefalign.config import DPOConfig, EvalConfig, LengthArgs
from prefalign.data.content import images_of, text_of
from prefalign.data.load import load_rows, normalize_rows
from prefalign.data.templates import resolve_chat_template
from prefalign.errors import PrefalignError
from prefalign.model.checks import same_model_path
from prefalign.model.load import load_for_inference, load_model_for_inference
from prefalign.rollout.answers import generate_reply, greedy_answers
from prefalign.rollout.rewards import RewardModelScorer, load_reward_function
from prefalign.stages.dpo import pair_metrics
from prefalign.train.run_dir import RUN_FILE

SHOWN = ("eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen", "eval_rewards/rejected",
         "eval_loss", "win_rate")


def recorded_reference(model_path: str) -> tuple[dict[str, Any], Path] | None:
    """The reference a run of ours used, {"model": ..., "adapter": ... or absent}, and the file that says so."""
    run_file, cfg_file = Path(model_path) / RUN_FILE, Path(model_path) / "prefalign_config.json"
    if run_file.is_file():
        reference = json.loads(run_file.read_text(encoding="utf-8")).get("reference")
        if reference and reference.get("model"):
            return reference, run_file
    if not cfg_file.is_file():
        return None
    recorded = json.loads(cfg_file.read_text(encoding="utf-8"))  # a run of an older version: the same rules
    if recorded.get("ref_model_name_or_path"):
        return {"model": recorded["ref_model_name_or_path"]}, cfg_file
    if recorded.get("peft_adapter_path"):
        return {"model": recorded.get("model_name_or_path"), "adapter": recorded["peft_adapter_path"]}, cfg_file
    return ({"model": recorded["model_name_or_path"]}, cfg_file) if recorded.get("model_name_or_path") else None


def _scores(judge: Any, prompts: list[Any], answers: list[str], columns: dict[str, list]) -> list[float]:
    """One score per answer. Judges get the answers as strings; the reward-model scorer gets conversational
    answers as one-message lists, which it renders with the chat template after the prompt."""
    completions: list[Any] = list(answers)
    if isinstance(judge, RewardModelScorer):
        completions = [a if isinstance(p, str) else [{"role": "assistant", "content": a}]
                       for p, a in zip(prompts, answers)]
    scores = judge(prompts=prompts, completions=completions, **columns)
    return [math.nan if s is None else float(s) for s in scores]


def win_rate(policy_scores: list[float], reference_scores: list[float]) -> float:
    """Fraction of prompts where the policy's score beats the reference's; ties count one half."""
    pairs = [(a, b) for a, b in zip(policy_scores, reference_scores) if not (math.isnan(a) or math.isnan(b))]
    if not pairs:
        return math.nan
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)


def generate_answers(model: Any, tokenizer: Any, prompts: list[Any], cfg: EvalConfig) -> list[str]:
    """Greedy (batched, left-padded) or sampled answers to `prompts`."""
    if cfg.temperature == 0:
        return greedy_answers(model, tokenizer, prompts, batch_size=cfg.per_device_eval_batch_size,
                              max_new_tokens=cfg.max_new_tokens)
    torch.manual_seed(cfg.seed)
    return [generate_reply(model, tokenizer, [{"role": "user", "content": p}] if isinstance(p, str) else p,
                           max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature) for p in prompts]


def _check(cfg: EvalConfig) -> None:
    for flag in ("model_name_or_path", "dataset_name"):
        if not getattr(cfg, flag):
            raise PrefalignError("is required", f"--{flag}")
    if cfg.beta <= 0:
        raise PrefalignError(f"must be positive, got {cfg.beta}", "--beta")
    if cfg.judge and cfg.reward_model_name_or_path:
        raise PrefalignError("choose one of --judge and --reward_model_name_or_path", "--judge")
    if cfg.num_samples < 0 or cfg.per_device_eval_batch_size < 1:
        flag = "--num_samples" if cfg.num_samples < 0 else "--per_device_eval_batch_size"
        raise PrefalignError("must not be negative" if cfg.num_samples < 0 else "must be at least 1", flag)


def _load(cfg: EvalConfig) -> tuple[Any, Any, Any, Any, str]:
    """(policy, reference model or None for the policy's base with its adapter disabled, tokenizer, processor or
    None, which reference that is, in words)."""
    policy, tokenizer, processor = load_for_inference(cfg.model_name_or_path, tokenizer_path=cfg.tokenizer_name_or_path,
                                                      trust_remote_code=cfg.trust_remote_code)
    trust = cfg.trust_remote_code
    base = policy.peft_config["default"].base_model_name_or_path if isinstance(policy, PeftModel) else None
    if cfg.ref_model_name_or_path:
        reference, why = {"model": cfg.ref_model_name_or_path}, "--ref_model_name_or_path"
    elif (found := recorded_reference(cfg.model_name_or_path)) is not None:
        reference, why = found[0], f"recorded in {found[1]}"
    elif base is not None:
        reference, why = {"model": base}, "the adapter's base; no reference recorded"
    else:
        raise PrefalignError("no reference recorded for this model; pass --ref_model_name_or_path",
                             "--ref_model_name_or_path")
    adapter = reference.get("adapter")
    if reference.get("synced"):
        why += "; the run moved its reference during training (--sync_ref_model): this is where it started"
    if adapter is None and base and reference["model"] and same_model_path(reference["model"], base):
        return policy, None, tokenizer, processor, f"{base} (the policy's base, adapter disabled; {why})"
    if adapter is not None:
        model = load_model_for_inference(adapter, base_model=reference["model"], trust_remote_code=trust)[0]
        return policy, model, tokenizer, processor, f"the adapter {adapter} on {reference['model']} ({why})"
    return policy, load_model_for_inference(reference["model"], trust_remote_code=trust)[0], tokenizer, processor, f"{reference['model']} ({why})"


def _dpo_config(cfg: EvalConfig) -> DPOConfig:
    """What DPO's evaluation step reads: the length limits, beta and the batch size (the pairs are already read)."""
    limits = {k: getattr(cfg, k) for k in LengthArgs.__dataclass_fields__}
    return DPOConfig(**limits, beta=cfg.beta, per_device_eval_batch_size=cfg.per_device_eval_batch_size)


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run every requested evaluation; returns {"metrics": {...}, "samples": [...], "num_pairs": n}."""
    _check(cfg)
    policy, reference, tokenizer, processor, described = _load(cfg)
    resolve_chat_template(tokenizer, cfg.chat_template)
    pairs = normalize_rows(load_rows(cfg.dataset_name, cfg.dataset_config, cfg.dataset_split), cfg, cfg.dataset_name)
    pairs = pairs[: cfg.max_eval_pairs] if cfg.max_eval_pairs else pairs
    metrics = pair_metrics(policy, reference, tokenizer, pairs, _dpo_config(cfg), processor)
    result: dict[str, Any] = {"num_pairs": len(pairs), "reference": described, "metrics": metrics, "samples": []}
    judge = (load_reward_function(cfg.judge) if cfg.judge else
             RewardModelScorer(cfg.reward_model_name_or_path, batch_size=cfg.per_device_eval_batch_size,
                               chat_template=cfg.reward_chat_template)
             if cfg.reward_model_name_or_path else None)
    if isinstance(judge, RewardModelScorer):
        judge.require_chat_template(any(p.is_conversational for p in pairs))
    if judge is None and not cfg.num_samples:
        return result
    n = len(pairs) if judge is not None else min(cfg.num_samples, len(pairs))
    with_image = next((p for p in pairs[:n] if p.is_conversational and images_of(p.prompt)), None)
    if with_image is not None:
        flag = "--judge" if cfg.judge else "--reward_model_name_or_path" if judge is not None else "--num_samples"
        raise PrefalignError(f"answering image prompts is not supported yet (first: {with_image.source}); the "
                             "pair metrics work on image data, drop this flag", flag)
    prompts = [p.prompt for p in pairs[:n]]
    ours = generate_answers(policy, tokenizer, prompts, cfg)
    if reference is None:
        with policy.disable_adapter():
            theirs = generate_answers(policy, tokenizer, prompts, cfg)
    else:
        theirs = generate_answers(reference, tokenizer, prompts, cfg)
    if judge is not None:
        columns = {k: [p.extra.get(k) for p in pairs[:n]] for k in (pairs[0].extra or {})}
        metrics["win_rate"] = win_rate(_scores(judge, prompts, ours, columns), _scores(judge, prompts, theirs, columns))
    result["samples"] = [{"prompt": p if isinstance(p, str) else text_of(p[-1]["content"]), "policy": a, "reference": b}
                         for p, a, b in list(zip(prompts, ours, theirs))[: cfg.num_samples]]
    return result


def format_result(result: dict[str, Any]) -> str:
    """The metrics as a two-column table, then the samples side by side."""
    lines = [f"reference: {result['reference']}", "", f"{'metric':<28} value", f"{'-' * 28} -----"]
    lines += [f"{k:<28} {v:.4f}" for k, v in result["metrics"].items() if k in SHOWN]
    lines.append(f"{'pairs':<28} {result['num_pairs']}")
    for s in result["samples"]:
        lines += ["", f"prompt:    {s['prompt']}", f"policy:    {s['policy']}", f"reference: {s['reference']}"]
    return "\n".join(lines)


def run_command(cfg: EvalConfig) -> None:
    """`prefalign eval`."""
    result = evaluate(cfg)
    print(format_result(result))
    if cfg.output_json:
        Path(cfg.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output_json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"eval: results written to {cfg.output_json}")
