"""Reward model: head creation, pooling, the Bradley-Terry loss with margin and centring, LoRA with the head."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from prefalign.config import RMConfig
from prefalign.data.types import TokenizedPair
from prefalign.stages.rm import RewardStage, load_reward_model


def cfg(model_dir, **kw) -> RMConfig:
    return RMConfig(model_name_or_path=str(model_dir), dataset_name="x", output_dir="o", **kw)


PAIRS = [TokenizedPair([5, 6, 7], [8, 9], [10], "f:1", margin=0.5),
         TokenizedPair([11, 12], [13, 14, 15, 16], [17, 18], "f:2", margin=None)]


def test_causal_lm_gets_a_new_score_head_with_pad_id(tiny_model_dir, tiny_tokenizer):
    model, new_head = load_reward_model(cfg(tiny_model_dir), tiny_tokenizer.pad_token_id)
    assert new_head and model.score.out_features == 1
    assert model.config.pad_token_id == tiny_tokenizer.pad_token_id


def test_loss_is_bradley_terry_minus_margin_plus_centring(tiny_model_dir, tiny_tokenizer):
    """Rewards of each sequence run alone (unpadded) r_c, r_r; per pair
    loss = -log sigmoid(r_c - r_r - margin) + 0.1 * (r_c + r_r)^2, summed; margin 0 where the column is absent."""
    c = cfg(tiny_model_dir, center_rewards_coefficient=0.1)
    model, _ = load_reward_model(c, tiny_tokenizer.pad_token_id)
    model.eval()
    stage = RewardStage(c, PAIRS, None, tiny_tokenizer.pad_token_id)
    loss, metrics = stage.step(model, stage.make_batch([0, 1], "train"))

    def alone(ids: list[int]) -> float:
        return model(torch.tensor([ids])).logits.item()

    expected, rewards, correct, margins = 0.0, [], 0, 0.0
    for p in PAIRS:
        rc, rr = alone(p.prompt_ids + p.chosen_ids), alone(p.prompt_ids + p.rejected_ids)
        expected += -math.log(1 / (1 + math.exp(-(rc - rr - (p.margin or 0.0))))) + 0.1 * (rc + rr) ** 2
        rewards += [rc, rr]
        correct += rc > rr
        margins += rc - rr
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["loss"] == (pytest.approx(expected, rel=1e-5), 2)
    assert metrics["accuracy"] == (correct, 2)
    assert metrics["margin"][0] == pytest.approx(margins, rel=1e-5)
    assert metrics["mean_reward"] == (pytest.approx(sum(rewards), rel=1e-5), 4)


def test_lora_trains_the_head_in_full_and_merged_model_reloads(tiny_model_dir, tiny_tokenizer, tmp_path):
    from prefalign.model.load import save_model

    model, _ = load_reward_model(cfg(tiny_model_dir, use_peft=True, lora_r=4), tiny_tokenizer.pad_token_id)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score" in n and "lora" not in n for n in trainable)  # the head itself
    assert any("lora_A" in n for n in trainable) and not any("score" in n and "lora" in n for n in trainable)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "score" in n and p.requires_grad).add_(0.5)
    ids = torch.tensor([[5, 6, 7, 8]])
    expected = model(ids).logits.item()
    save_model(model, tiny_tokenizer, tmp_path, merge_adapter=True)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged.config.pad_token_id == tiny_tokenizer.pad_token_id
    assert merged(ids).logits.item() == pytest.approx(expected, rel=1e-5)
