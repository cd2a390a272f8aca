"""On-policy distillation (`prefalign distill`): a student learns a teacher's next-token distributions, TRL's GKD.

Data: SFT rows with a prompt, `messages` (the last assistant turn is the completion, the turns before it the
prompt, as TRL's GKD collator splits them) or `prompt` + `completion`; plain `text` rows have no prompt to sample
from and are refused.

A micro-batch's completions come from one of three sources, drawn per micro-batch with probability `--lmbda`
(TRL draws per micro-batch too):
- on-policy: the student samples one completion per prompt (`--temperature`, `--max_new_tokens`);
- otherwise the dataset's completions, or with `--seq_kd` completions the teacher samples the same way.
The draw and the sampling are seeded by (seed, epoch, micro-batch), so a run is reproducible and a resumed run
draws and samples what the uninterrupted one would have. Completions are sampled in `begin_step`, before the loop
weighs the step, so the loss is a token mean over the whole optimizer step's completion tokens, the ones actually
trained on (TRL's GKDTrainer divides on-policy steps by the dataset's token count instead; its
DistillationTrainer, like us, by the generated one), and batch B x A equals A·B x 1.

Loss: `losses.distill.generalized_jsd` of student and teacher logits at every completion token, computed chunk by
chunk over the full vocabulary (`model.divergence`), at temperature 1 as TRL's GKDTrainer does (its
`temperature` only shapes sampling). The teacher is frozen, in eval mode, and must share the student's vocabulary
(and tokenizer, when it ships one).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer

from prefalign.config import DistillConfig
from prefalign.config.checks import check_train_args, require
from prefalign.data.collate import collate_padded_completions
from prefalign.data.sft import load_sft_examples, tokenize_sft
from prefalign.data.types import SFTExample, TokenizedSample
from prefalign.errors import PrefalignError
from prefalign.losses.distill import generalized_jsd
from prefalign.model.divergence import token_divergences
from prefalign.model.load import load_pretrained
from prefalign.rollout.generate import generate_completions
from prefalign.rollout.sampling import padded_layout
from prefalign.rollout.schedule import rollout_seed
from prefalign.train.loop import LoopResult, sequential_groups, shuffled_groups
from prefalign.train.metrics import MetricSums
from prefalign.train.runinfo import RunFacts, SplitCount
from prefalign.train.setup import Session, open_session, train_and_save, trainable_policy
from prefalign.train.zero import generation_weights


def check_distill_config(cfg: DistillConfig) -> None:
    require(cfg, "model_name_or_path", "dataset_name", "teacher_model_name_or_path")
    for flag in ("lmbda", "beta"):
        value = getattr(cfg, flag)
        if not 0.0 <= value <= 1.0:
            raise PrefalignError(f"must lie in [0, 1], got {value}", f"--{flag}")
    if cfg.temperature <= 0:
        raise PrefalignError(f"must be > 0 for sampling, got {cfg.temperature}", "--temperature")
    if cfg.max_new_tokens < 1:
        raise PrefalignError(f"must be at least 1, got {cfg.max_new_tokens}", "--max_new_tokens")
    check_train_args(cfg)


@dataclass(frozen=True)
class DistillExample:
    """A prompt to sample from and the dataset's prompt + completion."""

    prompt_ids: list[int]
    input_ids: list[int]  # prompt_ids + the dataset completion
    source: str


@dataclass(frozen=True)
class MicroBatch:
    """Micro-batch `index` of `epoch`: the examples `rows` (its draw and sampling seed come from the position)."""

    epoch: int
    index: int
    rows: tuple[int, ...]

    def __len__(self) -> int:  # the loop counts a micro-batch's examples with len()
        return len(self.rows)


def _last_span(sample: TokenizedSample) -> tuple[int, int]:
    """[start, end) of the last run of target tokens: the completion (earlier assistant turns are prompt)."""
    end = max(i for i, m in enumerate(sample.loss_mask) if m) + 1
    start = end
    while start > 1 and sample.loss_mask[start - 1]:
        start -= 1
    return start, end


def distill_examples(examples: list[SFTExample], tokenizer: Any, cfg: DistillConfig) -> tuple[list[DistillExample], Any]:
    """Prompts and dataset completions of SFT examples (see the module docstring), with the tokenizer's stats."""
    for ex in examples:
        if not ex.is_conversational and not ex.prompt:
            raise PrefalignError("distillation needs a prompt to sample from: give 'messages' or 'prompt' + "
                                 "'completion' rows, not plain text", ex.source)
    samples, stats = tokenize_sft(examples, tokenizer, cfg)
    out = []
    for s in samples:
        start, end = _last_span(s)
        out.append(DistillExample(s.input_ids[:start], s.input_ids[:end], s.source))
    return out, stats


def dataset_batch(examples: Sequence[DistillExample], pad_token_id: int) -> dict[str, Tensor]:
    """The dataset's prompt + completion rows in the padded layout of `model.logprobs`."""
    return collate_padded_completions([(e.prompt_ids, (e.input_ids[len(e.prompt_ids):],)) for e in examples],
                                      pad_token_id)


class DistillStage:
    """GKD on the loop (see train.loop.Stage): micro-batches of examples whose completions are drawn in
    `begin_step`; the loss is the summed per-token divergence, weighed by completion tokens."""

    example_unit = "samples"
    progress_keys = {"loss": "loss", "on_policy": "on-policy", "completions/mean_length": "len"}

    def __init__(self, cfg: DistillConfig, student: nn.Module, teacher: nn.Module, tokenizer: Any,
                 train: list[DistillExample], eval_: list[DistillExample] | None) -> None:
        self.cfg, self.student, self.teacher, self.tokenizer = cfg, student, teacher, tokenizer
        self.data = {"train": train, "eval": eval_ or []}
        self.divergence = functools.partial(generalized_jsd, beta=cfg.beta, temperature=1.0)
        self._drawn: dict[tuple[int, int], dict[str, Any]] = {}

    def train_groups(self, epoch: int) -> list[MicroBatch]:
        groups = shuffled_groups(len(self.data["train"]), self.cfg.per_device_train_batch_size, self.cfg.seed, epoch)
        return [MicroBatch(epoch, i, tuple(g)) for i, g in enumerate(groups)]

    def eval_groups(self) -> list[list[int]]:
        return sequential_groups(len(self.data["eval"]), self.cfg.per_device_eval_batch_size)

    def begin_step(self, groups: Sequence[MicroBatch]) -> None:
        """Draw each micro-batch's source and sample its completions (every process draws every micro-batch of the
        step: their token counts normalise the step)."""
        self._drawn = {(g.epoch, g.index): self._draw(g) for g in groups}

    def _draw(self, group: MicroBatch) -> dict[str, Any]:
        cfg = self.cfg
        seed = rollout_seed(cfg.seed, group.epoch, group.index)
        on_policy = torch.rand(1, generator=torch.Generator().manual_seed(seed)).item() < cfg.lmbda
        examples = [self.data["train"][i] for i in group.rows]
        sampler = self.student if on_policy else self.teacher if cfg.seq_kd else None
        if sampler is None:
            batch = dataset_batch(examples, self.tokenizer.pad_token_id)
        else:
            prompts = [e.prompt_ids for e in examples]
            with generation_weights(sampler):  # the student under ZeRO-3: its weights gathered once
                out = generate_completions(sampler, self.tokenizer, prompts, num_generations=1,
                                           max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature,
                                           seed=seed)
            batch = padded_layout(prompts, out.completion_ids, out.completion_mask, self.tokenizer.pad_token_id)
        batch["on_policy"] = float(on_policy)
        return batch

    def batch_weight(self, group: Any, split: str) -> float:
        if split == "train":
            return float(self._drawn[(group.epoch, group.index)]["completion_mask"].sum())
        return float(sum(len(self.data[split][i].input_ids) - len(self.data[split][i].prompt_ids) for i in group))

    def make_batch(self, group: Any, split: str) -> dict[str, Any]:
        if split == "train":
            batch = dict(self._drawn[(group.epoch, group.index)])
        else:
            batch = dataset_batch([self.data[split][i] for i in group], self.tokenizer.pad_token_id)
            batch["on_policy"] = 0.0
        batch["num_tokens"] = int(batch["attention_mask"].sum())
        return batch

    def step(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, MetricSums]:
        divergences = token_divergences(model, self.teacher, batch, self.divergence)  # (N,)
        loss_sum = divergences.sum()
        tokens, rows = float(divergences.numel()), float(batch["input_ids"].size(0))
        metrics: MetricSums = {"loss": (loss_sum.item(), tokens), "on_policy": (batch["on_policy"], 1.0),
                               "completions/mean_length": (tokens, rows)}
        return loss_sum, metrics

    def eval_step(self, model: nn.Module, batch: dict[str, Any]) -> MetricSums:
        return self.step(model, batch)[1]


def load_teacher(cfg: DistillConfig, student: nn.Module, tokenizer: Any, device: Any) -> nn.Module:
    """The frozen teacher, refused (one line naming the flag) when its vocabulary or tokenizer is not the student's."""
    flag = "--teacher_model_name_or_path"
    teacher = load_pretrained(cfg.teacher_model_name_or_path, cfg, flag)
    sizes = [m.config.get_text_config().vocab_size for m in (student, teacher)]
    if sizes[0] != sizes[1]:
        raise PrefalignError(f"the teacher's vocabulary has {sizes[1]} tokens, the student's {sizes[0]}; distillation "
                             "compares distributions token by token, so both need one tokenizer (cross-tokenizer "
                             "distillation is not supported)", flag)
    try:  # a teacher directory without tokenizer files is taken to use the student's
        own = AutoTokenizer.from_pretrained(cfg.teacher_model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, TypeError):
        own = None
    if own is not None and own.get_vocab() != tokenizer.get_vocab():
        raise PrefalignError("the teacher's tokenizer maps tokens to other ids than the student's; distillation needs "
                             "one tokenizer for both (cross-tokenizer distillation is not supported)", flag)
    return teacher.to(device).eval().requires_grad_(False)


def train_distill(cfg: DistillConfig) -> LoopResult:
    """GKD end to end: data → student and teacher → loop → final student in cfg.output_dir."""
    check_distill_config(cfg)
    session: Session = open_session(cfg)
    train_rows, eval_rows = load_sft_examples(cfg)
    train, stats = distill_examples(train_rows, session.tokenizer, cfg)
    eval_, eval_stats = distill_examples(eval_rows, session.tokenizer, cfg) if eval_rows else (None, None)
    student = trainable_policy(cfg, session, no_dropout=cfg.disable_dropout)
    teacher = load_teacher(cfg, student, session.tokenizer, session.device)
    stage = DistillStage(cfg, student, teacher, session.tokenizer, train, eval_)
    splits = [SplitCount.of(name, s, "samples") for name, s in (("train", stats), ("eval", eval_stats)) if s]
    source = "the teacher's samples" if cfg.seq_kd else "the dataset's completions"
    divergence = {0.0: "forward KL(teacher || student) (beta=0)", 1.0: "reverse KL(student || teacher) (beta=1)"}.get(
        cfg.beta, f"generalized JSD with beta={cfg.beta:g}")
    facts = RunFacts(splits, "samples", "padded prompt + completion rows", "none (the teacher is the target)",
                     {"teacher": f"{cfg.teacher_model_name_or_path} (frozen)",
                      "completions": f"{cfg.lmbda:g} of the micro-batches sampled by the student, the rest "
                                     f"{source}; loss: {divergence}"})
    return train_and_save(stage, student, cfg, session, "distill", facts)
