"""The demo's training stages: each builds the typed config of one real trainer and calls it in-process.

Sizes and hyper-parameters live in `Sizes`; `FULL` is what `make demo` runs, `QUICK` a much smaller version for
the test suite. The values of `FULL` were tuned on the trainers themselves (see the README's demo section).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REWARD_FUNCTION = "prefalign.demo.rewards:judge_reward"


@dataclass(frozen=True)
class Sizes:
    """How much data and how many steps each stage gets."""

    corpus: int = 4000  # tokenizer corpus documents
    vocab_size: int = 264  # 256 bytes + 3 special tokens + 5 merges (" +", "Wh", "at", "is", " ="); digits never merge
    sft_rows: int = 6000
    # 2000, not 1000: at 1000 steps the SFT model is still learning to add and its held-out accuracy swung from 0.21
    # to 0.43 between runs (thread scheduling alone changes the trajectory); at 2000 it measured 0.35 and 0.56
    # (seeds 0 and 1), inside the 30-70% band, towards the ~0.55 a converged model gets (carry prompts wrong).
    sft_steps: int = 2000
    sft_batch: int = 64
    dpo_pairs: int = 4800
    dpo_steps: int = 150
    dpo_batch: int = 32
    rm_steps: int = 1200
    grpo_steps: int = 60
    grpo_prompts_per_step: int = 16
    ppo_steps: int = 120
    ppo_batch: int = 64
    rl_prompts: int = 2000
    rm_pairs: int = 4800
    eval_prompts: int = 400
    eval_steps: int | None = 50  # DPO/RM evaluation on held-out pairs every this many steps (plot markers)


FULL = Sizes()
QUICK = replace(FULL, corpus=1000, sft_rows=600, sft_steps=40, dpo_pairs=160, dpo_steps=5, rm_steps=5,
                rm_pairs=160, grpo_steps=2, grpo_prompts_per_step=4, ppo_steps=2, ppo_batch=8, rl_prompts=64, eval_prompts=40,
                eval_steps=None)


def rm_pair_rows(n: int, seed: int) -> list[dict]:
    """Pairs for the reward model: the right sum chosen; rejected, half the time the task's own wrong answer, else
    the sum with its tens digit off by one either way. The task's wrong answers on carry prompts are all *below*
    the right sum, and a reward model trained on them alone learns "a larger sum is better", which PPO exploits
    (measured: held-out accuracy fell from 0.40 to 0.17 with answers inflated by 10 and more). A third share with
    the ones digit off by one made the reward model worse (held-out pair accuracy 0.57 instead of 0.78)."""
    import random

    from prefalign.demo import task

    rng = random.Random(seed)
    rows = []
    for p in task.make_prompts(n, seed, "train"):
        a, b = task.operands(p)
        rejected = task.wrong_answer(p, rng) if rng.random() < 0.5 else f"{a} + {b} = {a + b + rng.choice([-10, 10])}"
        rows.append({"prompt": [{"role": "user", "content": p}],
                     "chosen": [{"role": "assistant", "content": task.reference_answer(p)}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


def is_done(model_dir: Path) -> bool:
    """A stage is finished when its final model (or tokenizer) was saved; trainers move the files in atomically."""
    if model_dir.name == "tokenizer":
        return (model_dir / "tokenizer.json").is_file()
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def _common(out: Path, seed: int, quiet: bool) -> dict[str, Any]:
    # overwrite: a directory without a final model holds an interrupted attempt, which the stage starts afresh
    return {"output_dir": str(out), "overwrite_output_dir": True, "seed": seed, "save_steps": 0,
            "disable_tqdm": quiet, "logging_steps": 5}


def train_tokenizer(corpus: Path, out: Path, sizes: Sizes) -> None:
    from prefalign.tokenizer_command import TrainTokenizerConfig, train_tokenizer

    train_tokenizer(TrainTokenizerConfig(dataset_name=str(corpus), vocab_size=sizes.vocab_size,
                                         output_dir=str(out), overwrite_output_dir=True))


def init_model(tokenizer_dir: Path, out: Path, seed: int) -> None:
    from prefalign.model.init_command import InitModelConfig, init_model_command

    # Qwen2, hidden 64, 2 layers, 4 heads, tied embeddings: about 112k parameters, trained in about a minute
    init_model_command(InitModelConfig(tokenizer=str(tokenizer_dir), output_dir=str(out), hidden_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                                       overwrite_output_dir=True, seed=seed))


def sft(init_dir: Path, data: Path, out: Path, sizes: Sizes, seed: int, quiet: bool) -> Any:
    from prefalign.train.sft import SFTConfig, train_sft

    return train_sft(SFTConfig(
        model_name_or_path=str(init_dir), dataset_name=str(data), max_length=64,
        learning_rate=5e-3, lr_scheduler_type="cosine_with_min_lr", min_lr_rate=0.1, warmup_steps=30,
        adam_beta2=0.98, per_device_train_batch_size=sizes.sft_batch, max_steps=sizes.sft_steps,
        **_common(out, seed, quiet)))


def dpo(sft_dir: Path, pairs: Path, heldout_pairs: Path, out: Path, sizes: Sizes, seed: int, quiet: bool) -> Any:
    from prefalign.config import DPOConfig
    from prefalign.train.dpo import train_dpo

    # Plain DPO collapses this tiny model (it stops copying the operands): the RPO term (NLL of the chosen answer)
    # keeps the answer format while the preference term moves probability from the wrong sum to the right one.
    # rpo_alpha 1.0 at lr 2e-4 gave +0.36 / +0.28 over SFT (seeds 0 / 1); 2.0 at lr 3e-4 gave +0.47 / +0.43.
    return train_dpo(DPOConfig(
        model_name_or_path=str(sft_dir), dataset_name=str(pairs), eval_dataset_name=str(heldout_pairs),
        beta=0.1, rpo_alpha=2.0, learning_rate=3e-4, warmup_steps=10, lr_scheduler_type="constant_with_warmup",
        adam_beta2=0.98, per_device_train_batch_size=sizes.dpo_batch, per_device_eval_batch_size=64,
        max_steps=sizes.dpo_steps, eval_steps=sizes.eval_steps, max_length=64, **_common(out, seed, quiet)))


def reward_model(sft_dir: Path, pairs: Path, heldout_pairs: Path, out: Path, sizes: Sizes, seed: int,
                 quiet: bool) -> Any:
    from prefalign.train.rm import RMConfig, train_rm

    return train_rm(RMConfig(
        model_name_or_path=str(sft_dir), dataset_name=str(pairs), eval_dataset_name=str(heldout_pairs),
        learning_rate=1e-3, warmup_steps=10, lr_scheduler_type="cosine", adam_beta2=0.98, eval_steps=sizes.eval_steps and 200,
        center_rewards_coefficient=0.01, per_device_train_batch_size=sizes.dpo_batch, per_device_eval_batch_size=64,
        max_steps=sizes.rm_steps, max_length=64, **_common(out, seed, quiet)))


def grpo(sft_dir: Path, prompts: Path, out: Path, sizes: Sizes, seed: int, quiet: bool) -> Any:
    from prefalign.train.grpo import GRPOConfig, train_grpo

    generations = 8
    return train_grpo(GRPOConfig(
        model_name_or_path=str(sft_dir), dataset_name=str(prompts), reward_funcs=[REWARD_FUNCTION],
        num_generations=generations, per_device_train_batch_size=sizes.grpo_prompts_per_step * generations,
        max_completion_length=16, temperature=1.0, beta=0.0, loss_type="dapo", learning_rate=2e-4,
        warmup_steps=5, lr_scheduler_type="constant_with_warmup", adam_beta2=0.98, max_steps=sizes.grpo_steps,
        **_common(out, seed, quiet)))


def ppo(sft_dir: Path, rm_dir: Path, prompts: Path, out: Path, sizes: Sizes, seed: int, quiet: bool) -> Any:
    from prefalign.train.ppo import PPOConfig, train_ppo

    return train_ppo(PPOConfig(
        model_name_or_path=str(sft_dir), dataset_name=str(prompts), reward_model_name_or_path=str(rm_dir),
        per_device_train_batch_size=sizes.ppo_batch, num_mini_batches=1, num_ppo_epochs=4,
        max_completion_length=16, temperature=1.0, kl_coef=0.3, missing_eos_penalty=1.0, learning_rate=3e-4,
        warmup_steps=5, lr_scheduler_type="constant_with_warmup", adam_beta2=0.98, max_steps=sizes.ppo_steps,
        **_common(out, seed, quiet)))
