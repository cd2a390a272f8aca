"""What the demo measures on held-out prompts: greedy accuracy, and the KL of a policy from its reference.

Greedy decoding is batched with left padding (every row's next token sits at the same position), so one
`generate` call answers a whole batch of prompts.

KL from the reference: for each held-out prompt x the policy writes its greedy completion y; at every completion
token t we take the *exact* KL between the two next-token distributions over the whole vocabulary,
KL(pi(. | x, y<t) || pi_ref(. | x, y<t)) = sum_v pi(v) (log pi(v) - log pi_ref(v)), and average over all completion
tokens of all prompts (EOS included). The vocabulary is small here, so no sampling estimate is needed; the
completion comes from the policy, so this is the policy's per-token KL along its own (greedy) path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from prefalign.data.templates import render
from prefalign.demo import task
from prefalign.rollout.generate import left_pad


def chat_prompt_ids(tokenizer: Any, prompts: Sequence[Any]) -> list[list[int]]:
    """Token ids of each prompt (a string is one user turn; a message list is used as is) with the generation
    prompt, encoded without special tokens since the template writes its own (as SFT and DPO encode it)."""
    out = []
    for p in prompts:
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        text = render(tokenizer, messages, add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


@torch.no_grad()
def greedy_completions(model: Any, tokenizer: Any, prompts: Sequence[Any], *, batch_size: int = 128,
                       max_new_tokens: int = 16, desc: str | None = None) -> list[list[int]]:
    """Greedy completion token ids per prompt, cut after the first EOS (kept)."""
    model.eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids_all = chat_prompt_ids(tokenizer, prompts)
    out: list[list[int]] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None, leave=False):
        ids, mask = left_pad(ids_all[start:start + batch_size], pad)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=pad)  # (B, T + new)
        for row in gen[:, ids.shape[1]:].tolist():
            out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def greedy_answers(model: Any, tokenizer: Any, prompts: Sequence[Any], **kwargs: Any) -> list[str]:
    """Greedy completions of `prompts` as text (special tokens dropped)."""
    return [tokenizer.decode(c, skip_special_tokens=True) for c in greedy_completions(model, tokenizer, prompts, **kwargs)]


def judged_accuracy(prompts: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of answers the task's judge accepts."""
    if not prompts:
        raise ValueError("accuracy needs at least one prompt")
    return sum(task.judge(p, a) for p, a in zip(prompts, answers, strict=True)) / len(prompts)


@torch.no_grad()
def mean_token_kl(policy: Any, reference: Any, tokenizer: Any, prompts: Sequence[str],
                  completions: Sequence[list[int]], batch_size: int = 128) -> float:
    """Mean exact per-token KL(policy || reference) over the completion tokens (see the module docstring)."""
    policy.eval()
    reference.eval()
    prompt_ids = chat_prompt_ids(tokenizer, prompts)
    total, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        rows = [p + c for p, c in zip(prompt_ids[start:start + batch_size], completions[start:start + batch_size])]
        ids, mask = left_pad(rows, tokenizer.pad_token_id)  # (B, T)
        # position t-1 predicts token t; completion tokens are the last len(c) tokens of each row
        scored = torch.zeros_like(mask, dtype=torch.bool)  # (B, T): positions whose next token is a completion token
        for i, c in enumerate(completions[start:start + batch_size]):
            if c:
                scored[i, ids.shape[1] - len(c) - 1: ids.shape[1] - 1] = True
        logp = policy(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)[scored]  # (N, V)
        logq = reference(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)[scored]  # (N, V)
        total += float((logp.exp() * (logp - logq)).sum())
        count += int(scored.sum())
    return total / max(count, 1)
