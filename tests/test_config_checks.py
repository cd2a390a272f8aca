"""config.checks: what is refused before anything loads, as one PrefalignError naming the flag (the Python API
path; the command line refuses non-finite numbers already while parsing, see test_argparsing.py)."""

from __future__ import annotations

import math

import pytest

from prefalign.config import DPOConfig, SFTConfig
from prefalign.config.checks import check_train_args
from prefalign.errors import PrefalignError


@pytest.mark.parametrize("changes, message", [
    ({"learning_rate": math.nan}, "--learning_rate: must be a finite number, got nan"),
    ({"learning_rate": math.inf}, "--learning_rate: must be a finite number, got inf"),
    ({"adam_epsilon": -math.inf}, "--adam_epsilon: must be a finite number, got -inf"),
    ({"loss_weights": [1.0, math.nan]}, "--loss_weights: must be a finite number, got nan"),
    ({"warmup_ratio": 2.0}, "--warmup_ratio: must be between 0 and 1 (a fraction of all steps), got 2.0"),
    ({"warmup_ratio": -0.1}, "--warmup_ratio: must be between 0 and 1 (a fraction of all steps), got -0.1"),
    ({"warmup_steps": -1}, "--warmup_steps: must not be negative, got -1"),
    ({"min_lr_rate": 1.5}, "--min_lr_rate: must be between 0 and 1 (a fraction of the peak), got 1.5"),
    ({"eval_steps": 0}, "--eval_steps: must be at least 1 (leave it out to evaluate only at the end), got 0"),
    ({"save_steps": -5}, "--save_steps: must not be negative (0 disables checkpoints), got -5"),
    ({"lora_r": 0}, "--lora_r: must be at least 1, got 0"),
    ({"lora_alpha": 0}, "--lora_alpha: must be positive, got 0"),
    ({"lora_dropout": 1.0}, "--lora_dropout: must be in [0, 1), got 1.0"),
    ({"lora_target_modules": []}, "--lora_target_modules: give at least one module name"),
    ({"optim": "sgd"}, "--optim: unknown optimizer 'sgd'; choose one of adamw_torch_fused, adamw_torch"),
])
def test_refused_before_anything_loads(changes, message):
    cfg = DPOConfig(model_name_or_path="m", dataset_name="d", output_dir="o", **changes)
    with pytest.raises(PrefalignError) as e:
        check_train_args(cfg)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_valid_edges_pass():
    check_train_args(DPOConfig(output_dir="o", warmup_ratio=1.0, min_lr_rate=0.0, eval_steps=1, lora_r=1))
    check_train_args(SFTConfig(output_dir="o", save_steps=0))
