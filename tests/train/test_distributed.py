"""The FSDP plan read from Accelerate's settings and micro-batch padding (the sharded runs themselves are in
tests/e2e/test_fsdp.py; DeepSpeed's settings in tests/train/test_zero.py)."""

from __future__ import annotations

import pytest

from prefalign.errors import PrefalignError
from prefalign.train.distributed import (
    ShardPlan,
    no_weight,
    pad_groups,
    plan_from_plugin,
    shard_plan,
)


def test_pad_groups_gives_every_process_the_same_count():
    groups = [[0, 1], [2, 3], [4, 5]]
    # 3 micro-batches over 2 processes: rank 1 re-runs the first group with no weight
    assert pad_groups(groups, 0, 2) == [([0, 1], True), ([4, 5], True)]
    assert pad_groups(groups, 1, 2) == [([2, 3], True), ([0, 1], False)]
    assert pad_groups(groups, 0, 1) == [([0, 1], True), ([2, 3], True), ([4, 5], True)]
    assert pad_groups([[7]], 1, 2) == [([7], False)]
    assert no_weight({"loss": (2.5, 4.0)}) == {"loss": (0.0, 0.0)}


def test_shard_plan_from_accelerate_environment(monkeypatch):
    """The FSDP_* variables `accelerate launch` exports, read by Accelerate's own plugin, as our plan."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from prefalign.config import TrainArgs
    from prefalign.train.setup import make_accelerator

    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "Qwen2DecoderLayer")
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    assert plan_from_plugin(FullyShardedDataParallelPlugin()) == ShardPlan(False, ("Qwen2DecoderLayer",), False)
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "true")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    assert plan_from_plugin(FullyShardedDataParallelPlugin()) == ShardPlan(True, ("Qwen2DecoderLayer",), True)
    # an FSDP1 config names the same two layouts by sharding strategy
    monkeypatch.setenv("FSDP_VERSION", "1")
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "SHARD_GRAD_OP")
    assert plan_from_plugin(FullyShardedDataParallelPlugin()).reshard_after_forward is False
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "HYBRID_SHARD")
    with pytest.raises(PrefalignError, match="HYBRID_SHARD is not supported"):
        plan_from_plugin(FullyShardedDataParallelPlugin())
    # one process: nothing to shard over, whatever the environment says
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert shard_plan(make_accelerator(TrainArgs(output_dir="unused"))) is None
