"""Bradley-Terry reward model (`prefalign rm`) on the same preference formats and tokenization as DPO.

The model is `AutoModelForSequenceClassification` with one label: the decoder's hidden state at the last
non-pad token of prompt+answer, through a linear `score` head, is the reward. A causal-LM checkpoint has no
such head (the Qwen 0.5B case of the TRL post); transformers then creates one, randomly initialised, and we
train and save it with the model, with `pad_token_id` set in the config, because the head reads the last
token that is not padding and `from_pretrained(output_dir)` must pool the same token later (PPO).

Loss per pair, as TRL's RewardTrainer: -log sigmoid(r_chosen - r_rejected - margin) (the margin column is
optional, 0 when absent), plus center_rewards_coefficient x (r_chosen + r_rejected)^2 (Eisenstein et al.
2023), which keeps rewards centred on 0. Metrics carry TRL's names: loss, accuracy (chosen strictly above
rejected), margin (mean r_chosen - r_rejected), mean_reward (over both answers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from prefalign.config import RMConfig
from prefalign.config.checks import check_train_args, require
from prefalign.data.collate import collate_padded
from prefalign.data.tokenize import Truncation, load_tokenized_pairs
from prefalign.data.types import TokenizedPair
from prefalign.errors import PrefalignError
from prefalign.model.checks import check_lora_targets, check_vocab
from prefalign.model.load import has_new_head, load_score_model, peft_wrapping, prepare_base
from prefalign.train.loop import LoopResult, sequential_groups, shuffled_groups
from prefalign.train.metrics import MetricSums, to_host
from prefalign.train.runinfo import RunFacts, SplitCount
from prefalign.train.setup import open_session, train_and_save, vocab_flag


class RewardStage:
    """Bradley-Terry step for the loop (see train.loop.Stage)."""

    example_unit = "pairs"
    progress_keys = {"loss": "loss", "accuracy": "acc", "margin": "margin"}

    def __init__(self, cfg: RMConfig, train: list[TokenizedPair], eval_: list[TokenizedPair] | None,
                 pad_token_id: int) -> None:
        self.cfg = cfg
        self.data = {"train": train, "eval": eval_ or []}
        self.pad_token_id = pad_token_id

    def train_groups(self, epoch: int) -> list[list[int]]:
        return shuffled_groups(len(self.data["train"]), self.cfg.per_device_train_batch_size, self.cfg.seed, epoch)

    def eval_groups(self) -> list[list[int]]:
        return sequential_groups(len(self.data["eval"]), self.cfg.per_device_eval_batch_size)

    def batch_weight(self, group: Sequence[int], split: str) -> float:
        return float(len(group))

    def make_batch(self, group: Sequence[int], split: str) -> dict[str, Any]:
        pairs = [self.data[split][i] for i in group]
        batch = collate_padded(pairs, self.pad_token_id)  # rows: B prompt+chosen, then B prompt+rejected
        batch["margin"] = torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32)  # (B,)
        batch["num_tokens"] = int(batch["attention_mask"].sum())
        return batch

    def _forward(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, MetricSums]:
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        use_cache=False).logits.squeeze(-1).float()  # (2B,)
        b = batch["num_pairs"]
        chosen, rejected = rewards[:b], rewards[b:]  # (B,), (B,)
        losses = -F.logsigmoid(chosen - rejected - batch["margin"])  # (B,)
        if self.cfg.center_rewards_coefficient:
            losses = losses + self.cfg.center_rewards_coefficient * (chosen + rejected) ** 2
        d = rewards.detach()
        host = to_host({"loss": losses.sum(), "accuracy": (d[:b] > d[b:]).float().sum(),
                        "margin": (d[:b] - d[b:]).sum(), "mean_reward": d.sum()})
        metrics: MetricSums = {k: (v, 2 * b if k == "mean_reward" else b) for k, v in host.items()}
        return losses.sum(), metrics

    def step(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, MetricSums]:
        return self._forward(model, batch)

    def eval_step(self, model: torch.nn.Module, batch: dict[str, Any]) -> MetricSums:
        return self._forward(model, batch)[1]


def _lora_targets(model: torch.nn.Module) -> list[str]:
    """Names of the linear layers that get adapters: all of them but the score head (trained in full)."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names - {"score"})


def load_reward_model(cfg: RMConfig, pad_token_id: int) -> tuple[torch.nn.Module, bool]:
    """(model, whether a new score head was created). With --use_peft: LoRA on the body, the head trained in full;
    with --load_in_4bit (QLoRA) the same on a 4-bit body (transformers keeps the head, the last module, unquantized)."""
    model, info = load_score_model(cfg.model_name_or_path, "--model_name_or_path", cfg, with_info=True,
                                   quantize=cfg.load_in_4bit)
    new_head = has_new_head(info)
    # The head pools the last token that is not padding; saved in the config so that reloading pools the same.
    model.config.pad_token_id = pad_token_id
    model.config.use_cache = False
    model = prepare_base(model, quantized=cfg.load_in_4bit, gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.use_peft or cfg.load_in_4bit:
        check_lora_targets(model, cfg.lora_target_modules)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.lora_target_modules or _lora_targets(model),
                          task_type="SEQ_CLS", modules_to_save=["score"])
        with peft_wrapping():
            model = get_peft_model(model, lora)
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    return model, new_head


def resolve_rm_config(cfg: RMConfig) -> Truncation:
    """Everything that can be checked without loading a model or data; returns the length limits."""
    require(cfg, "model_name_or_path", "dataset_name")
    if cfg.center_rewards_coefficient is not None and cfg.center_rewards_coefficient < 0:
        raise PrefalignError(f"must not be negative, got {cfg.center_rewards_coefficient}",
                             "--center_rewards_coefficient")
    limits = Truncation.of(cfg)
    check_train_args(cfg)
    return limits


def train_rm(cfg: RMConfig) -> LoopResult:
    """Run reward modelling end to end: pairs → prompt+chosen / prompt+rejected ids → loop → saved model."""
    limits = resolve_rm_config(cfg)
    session = open_session(cfg)
    train, eval_, stats = load_tokenized_pairs(cfg, session.tokenizer, limits)
    model, new_head = load_reward_model(cfg, session.tokenizer.pad_token_id)
    check_vocab(model, session.tokenizer, vocab_flag(cfg))
    model = model.to(session.device)
    head = ("a new one-output score head, trained (the checkpoint has none)" if new_head
            else "the checkpoint's score head")
    stage = RewardStage(cfg, train, eval_, session.tokenizer.pad_token_id)
    facts = RunFacts([SplitCount.of(split, s, "pairs") for split, s in stats.items()], "pairs",
                     "padded: prompt + chosen and prompt + rejected rows; the head reads each row's last token",
                     "none (a reward model has no reference)", {"reward head": head})
    return train_and_save(stage, model, cfg, session, "rm", facts)
