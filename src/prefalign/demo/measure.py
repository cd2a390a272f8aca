"""What the demo measures on held-out prompts: greedy accuracy, and the KL of a policy from its reference.

Greedy answers come from `rollout.answers.greedy_completions` (batched with left padding).

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

from prefalign.demo import task
from prefalign.rollout.generate import chat_prompt_ids, left_pad


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
