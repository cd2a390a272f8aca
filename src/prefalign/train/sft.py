"""Supervised fine-tuning (and the causal-LM step pretraining shares) on the shared loop.

A micro-batch is a list of rows; a row is one or more segments (conversations, documents) laid end to end.
- Unpacked: one segment per row, right-padded, with an attention mask.
- Packed (`--packing`, and pretraining's per-document blocks): several segments per row, position ids restarting
  at 0 for every segment and no attention mask. transformers 5 turns position ids that restart into a
  block-diagonal causal mask (masking_utils.find_packed_sequence_indices, taken when attention_mask is None and
  there is no cache), for sdpa and eager on CPU as for flash-attention's varlen path, so no token attends to
  another segment. Padding at the end of a row is one more segment whose tokens are never targets.

The loss is the SUM of token cross-entropies over target tokens (the first token of a segment never is), and
`batch_weight` is their number, so the loop's normalisation gives the mean over all target tokens of the
optimizer step, whatever the packing, batch size or accumulation. The LM head runs only on the positions that
predict a target (`logits_to_keep` with an index tensor), so prompts cost no [T, V] logits.

NEFTune (Jain et al. 2023, as TRL offers it): during training, uniform noise in [-a, a] with
a = alpha / sqrt(L * d) is added to the input embeddings (L the batch's sequence length, d the hidden size);
evaluation and the saved model are untouched.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from prefalign.config import DataArgs, ModelArgs, TrainArgs
from prefalign.data.sft import TokenizedSample
from prefalign.errors import PrefalignError
from prefalign.train.loop import shuffled_groups
from prefalign.train.metrics import MetricSums
from prefalign.train.run import print_summary

Row = list[TokenizedSample]  # segments sharing one sequence


@dataclass
class SFTArgs:
    dataset_text_field: str = "text"
    """Column holding plain text rows (trained on every token)."""
    completion_only_loss: bool = True
    """Train only on assistant turns (conversations) or the completion (prompt/completion rows); false: every token."""
    packing: bool = False
    """Pack several samples into each sequence of up to --max_length tokens, without attention between them."""
    neftune_noise_alpha: float | None = None
    """NEFTune: add uniform noise of this scale (divided by sqrt(length x hidden size)) to input embeddings in training."""


@dataclass
class SFTConfig(SFTArgs, TrainArgs, DataArgs, ModelArgs):
    """Configuration of `prefalign sft`."""

    learning_rate: float = 2e-5
    """Peak learning rate of AdamW (TRL's SFT default)."""


# ---------------------------------------------------------------- batches


def row_length(row: Row) -> int:
    return sum(len(s.input_ids) for s in row)


def next_fit(lengths: Sequence[int], max_length: int | None) -> list[list[int]]:
    """Bins of consecutive positions: an item joins the current bin while the bin stays within `max_length`
    tokens, so the given (shuffled) order is kept and the same input always packs the same way."""
    bins: list[list[int]] = []
    used = 0
    for k, n in enumerate(lengths):
        if bins and (max_length is None or used + n <= max_length):
            bins[-1].append(k)
            used += n
        else:
            bins.append([k])
            used = n
    return bins


def pack_rows(rows: Sequence[Row], max_length: int | None) -> list[Row]:
    """Rows merged next-fit into sequences of up to `max_length` tokens."""
    return [[seg for k in b for seg in rows[k]] for b in next_fit([row_length(r) for r in rows], max_length)]


def collate_rows(rows: Sequence[Row], pad_token_id: int, segmented: bool) -> dict[str, Any]:
    """input_ids / labels / position_ids (B, T); `attention_mask` only when not segmented (see module docstring)."""
    width = max(row_length(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)  # (B, T): -100 = not a target
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for r, row in enumerate(rows):
        t = 0
        for seg in row:
            n = len(seg.input_ids)
            ids = torch.tensor(seg.input_ids, dtype=torch.long)
            input_ids[r, t:t + n] = ids
            labels[r, t:t + n] = torch.where(torch.tensor(seg.loss_mask), ids, -100)
            # one sequence when not segmented: positions continue across the row's segments
            position_ids[r, t:t + n] = torch.arange(n) if segmented else torch.arange(t, t + n)
            t += n
        attention_mask[r, :t] = 1
        position_ids[r, t:] = torch.arange(width - t)  # the padding: a segment of its own
    batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                             "num_tokens": int(attention_mask.sum())}
    if not segmented:
        batch["attention_mask"] = attention_mask
    return batch


def _supports_logits_to_keep(model: torch.nn.Module) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _forward_takes_logits_to_keep(type(inner))


@functools.cache
def _forward_takes_logits_to_keep(cls: type) -> bool:  # per model class, not per micro-batch
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def lm_loss(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, MetricSums]:
    """Summed next-token cross-entropy over target tokens, with mean_token_accuracy's (correct, total)."""
    targets = batch["labels"][:, 1:]  # (B, T-1): the token each position predicts
    cols = (targets != -100).any(0).nonzero().squeeze(-1)  # (K,) positions predicting a target in some row
    kwargs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    if _supports_logits_to_keep(model):
        logits = model(**kwargs, use_cache=False, logits_to_keep=cols).logits  # (B, K, V)
    else:
        logits = model(**kwargs, use_cache=False).logits[:, cols]  # (B, K, V)
    tgt = targets[:, cols]  # (B, K)
    keep = tgt != -100
    scored = logits[keep].float()  # (N, V)
    wanted = tgt[keep]  # (N,)
    loss_sum = F.cross_entropy(scored, wanted, reduction="sum")
    n = float(wanted.numel())
    correct = (scored.detach().argmax(-1) == wanted).sum()
    loss_value, correct = torch.stack([loss_sum.detach(), correct.to(loss_sum.dtype)]).tolist()  # one host sync
    return loss_sum, {"loss": (loss_value, n), "mean_token_accuracy": (correct, n)}


class CausalLMStage:
    """Next-token prediction over rows of segments (see train.loop.Stage). `pack` merges rows next-fit into
    sequences of up to `max_length`; `segmented` keeps attention inside each segment."""

    example_unit = "samples"
    progress_keys = {"loss": "loss", "mean_token_accuracy": "acc"}

    def __init__(self, train: list[Row], eval_: list[Row] | None, pad_token_id: int, *, batch_size: int,
                 eval_batch_size: int, seed: int, pack: bool, segmented: bool, max_length: int | None) -> None:
        self.data = {"train": train, "eval": eval_ or []}
        self.pad_token_id = pad_token_id
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.pack, self.segmented, self.max_length = pack, segmented or pack, max_length

    def _group(self, order: list[int], split: str, size: int) -> list[list[int]]:
        if not self.pack:
            return [order[i:i + size] for i in range(0, len(order), size)]
        # `size` packed sequences per micro-batch; make_batch re-packs the group the same way
        bins = next_fit([row_length(self.data[split][i]) for i in order], self.max_length)
        return [[order[k] for b in bins[j:j + size] for k in b] for j in range(0, len(bins), size)]

    def train_groups(self, epoch: int) -> list[list[int]]:
        order = [i for g in shuffled_groups(len(self.data["train"]), 1, self.seed, epoch) for i in g]
        return self._group(order, "train", self.batch_size)

    def eval_groups(self) -> list[list[int]]:
        return self._group(list(range(len(self.data["eval"]))), "eval", self.eval_batch_size)

    def batch_weight(self, group: Sequence[int], split: str) -> float:
        return float(sum(s.num_loss_tokens for i in group for s in self.data[split][i]))

    def make_batch(self, group: Sequence[int], split: str) -> dict[str, Any]:
        rows = [self.data[split][i] for i in group]
        if self.pack:
            rows = pack_rows(rows, self.max_length)
        return collate_rows(rows, self.pad_token_id, self.segmented)

    def step(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, MetricSums]:
        return lm_loss(model, batch)

    def eval_step(self, model: torch.nn.Module, batch: dict[str, Any]) -> MetricSums:
        return lm_loss(model, batch)[1]


def add_neftune(model: torch.nn.Module, alpha: float) -> Any:
    """Register NEFTune noise on the input embeddings (training mode only); returns the hook handle."""

    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        magnitude = alpha / math.sqrt(output.size(1) * output.size(2))  # alpha / sqrt(L * d)
        return output + torch.empty_like(output).uniform_(-magnitude, magnitude)

    return model.get_input_embeddings().register_forward_hook(hook)


# ---------------------------------------------------------------- driver shared with pretraining


def check_lm_config(cfg: Any) -> None:
    """Everything that can be checked before loading a model or data."""
    from prefalign.train.run import check_train_args, require

    require(cfg, "model_name_or_path", "dataset_name")
    if cfg.max_length is not None and cfg.max_length < 2:
        raise PrefalignError(f"must be at least 2, got {cfg.max_length}", "--max_length")
    if getattr(cfg, "neftune_noise_alpha", None) is not None and cfg.neftune_noise_alpha < 0:
        raise PrefalignError(f"must not be negative, got {cfg.neftune_noise_alpha}", "--neftune_noise_alpha")
    check_train_args(cfg)


def run_lm_training(cfg: Any, name: str, build_stage: Callable[[Any, Any], CausalLMStage]) -> Any:
    """tokenizer → stage (data) → model → loop → final model; `build_stage(tokenizer, accelerator)`."""
    from prefalign.model.load import load_policy, load_tokenizer
    from prefalign.train.run import make_accelerator, train_and_save

    check_lm_config(cfg)
    accelerator = make_accelerator(cfg)
    tokenizer = load_tokenizer(cfg)
    stage = build_stage(tokenizer, accelerator)
    model = load_policy(cfg, gradient_checkpointing=cfg.gradient_checkpointing).to(accelerator.device)
    if getattr(cfg, "neftune_noise_alpha", None):
        add_neftune(model, cfg.neftune_noise_alpha)

    return train_and_save(stage, model, tokenizer, cfg, accelerator, name)


def train_sft(cfg: SFTConfig) -> Any:
    """Run SFT end to end: rows → token ids with loss masks → loop → final model in cfg.output_dir."""
    from prefalign.data.sft import load_sft_examples, tokenize_sft
    from prefalign.data.templates import resolve_chat_template

    def build(tokenizer: Any, accelerator: Any) -> CausalLMStage:
        resolve_chat_template(tokenizer, cfg.chat_template)
        train_rows, eval_rows = load_sft_examples(cfg)
        train, stats = tokenize_sft(train_rows, tokenizer, cfg)
        accelerator.print(f"train: {stats.summary()}")
        eval_ = None
        if eval_rows:
            eval_, eval_stats = tokenize_sft(eval_rows, tokenizer, cfg)
            accelerator.print(f"eval: {eval_stats.summary()}")
        return CausalLMStage(
            [[s] for s in train], [[s] for s in eval_] if eval_ else None, tokenizer.pad_token_id,
            batch_size=cfg.per_device_train_batch_size, eval_batch_size=cfg.per_device_eval_batch_size,
            seed=cfg.seed, pack=cfg.packing, segmented=cfg.packing, max_length=cfg.max_length,
        )

    return run_lm_training(cfg, "sft", build)


SHOWN = ("loss", "mean_token_accuracy", "eval_loss", "eval_mean_token_accuracy")


CONFIG = SFTConfig


def run_command(cfg: SFTConfig) -> None:
    """`prefalign sft`."""
    print_summary("sft", train_sft(cfg), cfg.output_dir, SHOWN)
