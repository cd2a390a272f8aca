"""The FSDP plan read from Accelerate's settings, micro-batch padding, and the DeepSpeed refusal (the sharded runs
themselves are in tests/e2e/test_fsdp.py)."""

from __future__ import annotations

import pytest

from helpers import conv, run_cli, write_jsonl
from prefalign.errors import PrefalignError
from prefalign.train.distributed import (
    ShardPlan,
    check_launch,
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


def test_deepspeed_launch_is_a_one_line_error(monkeypatch, tiny_model_dir, tmp_path, capsys):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(PrefalignError, match="DeepSpeed is not supported"):
        check_launch()
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": conv(("user", "hi")), "chosen": conv(("assistant", "a")),
                                                   "rejected": conv(("assistant", "b"))}])
    assert run_cli("dpo", tiny_model_dir, data, tmp_path / "out", "--max_steps", 1) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["prefalign dpo: error: accelerate config: DeepSpeed is not supported; for ZeRO-3 use "
                   "configs/accelerate/fsdp.yaml, for ZeRO-2 configs/accelerate/fsdp_shard_grad_op.yaml "
                   "(FSDP shards the same way)"]
    assert not (tmp_path / "out").exists()  # refused before anything was written
