"""Supervised fine-tuning and pretraining: one causal-LM step on the shared loop.

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

Pretraining (`prefalign pretrain`, MiniMind-style from a freshly initialised model): documents are laid end to end
and cut into blocks (`data.corpus.pack_documents`). By default attention stays inside each document of a block:
every document (or the piece of one that continues from the previous block) is its own segment with position ids
from 0, and its first token is not a target, since nothing in its context predicts it. With
--per_document_attention false a block is one plain sequence (GPT-2 style concatenation).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from prefalign.config import PretrainConfig, SFTConfig
from prefalign.config.checks import check_train_args, require
from prefalign.data.collate import collate_rows
from prefalign.data.corpus import encode_documents, load_texts, pack_documents
from prefalign.data.load import split_holdout
from prefalign.data.packing import next_fit, pack_rows, row_length
from prefalign.data.sft import load_sft_examples, tokenize_sft
from prefalign.data.tokenize import split_names
from prefalign.data.types import Segments
from prefalign.errors import PrefalignError
from prefalign.train.loop import LoopResult, shuffled_groups
from prefalign.train.metrics import MetricSums, human
from prefalign.train.runinfo import RunFacts, SplitCount
from prefalign.train.setup import Session, open_session, train_and_save, trainable_policy

SHOWN = ("loss", "mean_token_accuracy", "eval_loss", "eval_mean_token_accuracy")  # the closing line's metrics


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

    def __init__(self, train: list[Segments], eval_: list[Segments] | None, pad_token_id: int, *, batch_size: int,
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


# ---------------------------------------------------------------- the two drivers


def check_lm_config(cfg: SFTConfig | PretrainConfig) -> None:
    """Everything that can be checked before loading a model or data."""
    require(cfg, "model_name_or_path", "dataset_name")
    if cfg.max_length is not None and cfg.max_length < 2:
        raise PrefalignError(f"must be at least 2, got {cfg.max_length}", "--max_length")
    if getattr(cfg, "neftune_noise_alpha", None) is not None and cfg.neftune_noise_alpha < 0:
        raise PrefalignError(f"must not be negative, got {cfg.neftune_noise_alpha}", "--neftune_noise_alpha")
    if isinstance(cfg, PretrainConfig) and cfg.max_length is None:
        raise PrefalignError("pretraining needs a block size", "--max_length")
    check_train_args(cfg)


def run_lm_training(cfg: SFTConfig | PretrainConfig, name: str,
                    build_stage: Callable[[Session], tuple[CausalLMStage, RunFacts]]) -> LoopResult:
    """tokenizer → stage (data) → model → loop → final model; `build_stage(session)` -> (stage, its facts)."""
    check_lm_config(cfg)
    session = open_session(cfg)
    stage, facts = build_stage(session)
    model = trainable_policy(cfg, session)
    if getattr(cfg, "neftune_noise_alpha", None):
        add_neftune(model, cfg.neftune_noise_alpha)
    return train_and_save(stage, model, cfg, session, name, facts)


def train_sft(cfg: SFTConfig) -> LoopResult:
    """Run SFT end to end: rows → token ids with loss masks → loop → final model in cfg.output_dir."""

    def build(session: Session) -> tuple[CausalLMStage, RunFacts]:
        train_rows, eval_rows = load_sft_examples(cfg)
        train_name, eval_name = split_names(cfg)
        train, stats = tokenize_sft(train_rows, session.tokenizer, cfg, train_name)
        splits = [SplitCount.of("train", stats, "samples")]
        eval_ = None
        if eval_rows:
            eval_, eval_stats = tokenize_sft(eval_rows, session.tokenizer, cfg, eval_name)
            splits.append(SplitCount.of("eval", eval_stats, "samples"))
        stage = CausalLMStage(
            [[s] for s in train], [[s] for s in eval_] if eval_ else None, session.tokenizer.pad_token_id,
            batch_size=cfg.per_device_train_batch_size, eval_batch_size=cfg.per_device_eval_batch_size,
            seed=cfg.seed, pack=cfg.packing, segmented=cfg.packing, max_length=cfg.max_length,
        )
        layout = (f"packed: samples end to end in sequences of up to {cfg.max_length} tokens, no attention between "
                  "them" if cfg.packing else "padded, one sample per row")
        unit = "packed sequences" if cfg.packing else "samples"
        return stage, RunFacts(splits, unit, layout, "none (supervised)")

    return run_lm_training(cfg, "sft", build)


def _blocks(name: str, cfg: PretrainConfig, tokenizer: Any, config: str | None, split: str) -> list[Segments]:
    texts = [t for t, _ in load_texts(name, config, split, cfg.dataset_text_field, skip_invalid=cfg.skip_invalid_rows)]
    return pack_documents(encode_documents(texts, tokenizer), cfg.max_length, cfg.per_document_attention)


def _tokens(blocks: list[Segments]) -> int:
    return sum(len(s.input_ids) for block in blocks for s in block)


def train_pretrain(cfg: PretrainConfig) -> LoopResult:
    """Run pretraining end to end: documents → blocks → loop → final model in cfg.output_dir."""

    def build(session: Session) -> tuple[CausalLMStage, RunFacts]:
        train = _blocks(cfg.dataset_name, cfg, session.tokenizer, cfg.dataset_config, cfg.dataset_split)
        eval_ = None
        if cfg.eval_dataset_name:
            eval_ = _blocks(cfg.eval_dataset_name, cfg, session.tokenizer, cfg.eval_dataset_config,
                            cfg.eval_dataset_split)
        elif cfg.eval_split_ratio:
            train, eval_ = split_holdout(train, cfg.eval_split_ratio, cfg.seed)
        splits = [SplitCount(name, len(blocks), None, "blocks", f"{human(_tokens(blocks))} tokens")
                  for name, blocks in (("train", train), ("eval", eval_)) if blocks]
        stage = CausalLMStage(
            train, eval_, session.tokenizer.pad_token_id, batch_size=cfg.per_device_train_batch_size,
            eval_batch_size=cfg.per_device_eval_batch_size, seed=cfg.seed, pack=False,
            segmented=cfg.per_document_attention, max_length=cfg.max_length,
        )
        attention = ("attention within each document (position ids restart per document)"
                     if cfg.per_document_attention else "plain concatenation (attention across documents)")
        return stage, RunFacts(splits, "blocks", f"blocks of {cfg.max_length} tokens, {attention}", "none (pretraining)")

    return run_lm_training(cfg, "pretrain", build)
