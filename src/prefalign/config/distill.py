"""Config of on-policy distillation (`prefalign distill`): TRL's GKD knobs on the training loop."""

from __future__ import annotations

from dataclasses import dataclass

from prefalign.config.common import DatasetArgs, ModelArgs, PromptArgs, TrainArgs


@dataclass
class GKDArgs:
    teacher_model_name_or_path: str | None = None
    """Teacher: a causal LM with the student's tokenizer (a local directory or a hub id); it is never trained."""
    lmbda: float = 0.5
    """Share of the micro-batches whose completions the student samples itself (on-policy); the others use the
    dataset's completions (or, with --seq_kd, the teacher's)."""
    beta: float = 0.5
    """Generalized Jensen-Shannon divergence: 0 = forward KL(teacher || student), 1 = reverse KL(student ||
    teacher), in between the JSD with the mixture beta x teacher + (1 - beta) x student."""
    temperature: float = 0.9
    """Sampling temperature of the student's (and, with --seq_kd, the teacher's) completions; the divergence
    compares the models' own distributions (temperature 1), as TRL's GKD does."""
    max_new_tokens: int = 128
    """Most tokens sampled per completion."""
    seq_kd: bool = False
    """Sequence-level KD: micro-batches that are not on-policy get completions sampled by the teacher instead of the
    dataset's."""
    disable_dropout: bool = True
    """Switch dropout off in the student (the teacher always runs in eval mode)."""


@dataclass
class DistillConfig(GKDArgs, TrainArgs, PromptArgs, DatasetArgs, ModelArgs):
    """Configuration of `prefalign distill`."""

    max_length: int | None = 1024
    """Longest prompt + completion of a dataset row in tokens; longer rows lose their end."""
    learning_rate: float = 2e-5
    """Peak learning rate of AdamW (TRL's GKD default, from SFT)."""
    per_device_train_batch_size: int = 8
    """Examples (prompt + one completion) per micro-batch on each device."""
