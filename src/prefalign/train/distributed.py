"""Sharded data parallelism (FSDP) for the one training loop, configured the way Accelerate users already do it.

`accelerate launch --config_file configs/accelerate/fsdp.yaml` exports `ACCELERATE_USE_FSDP` and the `FSDP_*`
settings; Accelerate turns them into a `FullyShardedDataParallelPlugin`. We read that plugin (or build it from the
same environment where Accelerate ignores FSDP: it only enables it on GPU-like backends, and we also run it on CPU
with gloo, which is how the tests prove it) and shard the model ourselves with PyTorch's `fully_shard` (FSDP2):
each decoder layer is one unit, the rest of the model the root unit. The loop never calls `accelerator.prepare` on
the model because it must keep calling the model's own forward with its hooks (the log-prob path), which FSDP2
allows: sharded modules keep their class and attributes.

What sharding changes for the loop, all kept here:
* gradients are reduce-scattered (averaged) by FSDP in backward, so the loop's own all-reduce is skipped;
* every process must run the same number of forwards (they contain collectives), so micro-batches are padded
  (`pad_groups`);
* weights and optimizer state are sharded: saving gathers full tensors on every process
  (`model.weights.full_state_dict`, `optimizer_state`) and the main process writes them in the usual Hugging Face / torch formats, so a checkpoint
  or final model does not depend on how many processes wrote it.

ZeRO-2 and ZeRO-3 map onto FSDP's SHARD_GRAD_OP (`reshard_after_forward: false`) and FULL_SHARD (`true`).
DeepSpeed's own ZeRO engine is `train/zero.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from prefalign.errors import PrefalignError
from prefalign.train import zero
from prefalign.train.metrics import Extreme, MetricSums


@dataclass(frozen=True)
class ShardPlan:
    """How to shard: which module classes become units, and FSDP2's per-unit options."""

    reshard_after_forward: bool
    """True: FULL_SHARD / ZeRO-3 (parameters re-gathered for backward); False: SHARD_GRAD_OP / ZeRO-2."""
    wrap_classes: tuple[str, ...]
    """Class names of the modules that become their own unit (empty: the model's `_no_split_modules`)."""
    cpu_offload: bool = False


def check_launch(use_deepspeed: bool = False) -> None:
    """Refuse launch configurations that would silently not do what they say, before any model is loaded."""
    if use_deepspeed:
        zero.check_launch()
        if zero.env_true("ACCELERATE_USE_FSDP"):
            raise PrefalignError("both FSDP (accelerate config) and DeepSpeed (--deepspeed) asked for; pick one",
                                 "--deepspeed")


def close_process_group() -> None:
    """At the end of a launched command: all processes meet, then the group goes down (through DeepSpeed when it
    ran, so that it forgets the groups it cached). Two gloo processes exiting with the group up can abort with
    "terminate called without an active exception"."""
    if not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()
    if zero.owns_process_group():
        import deepspeed.comm  # loaded already: this run used DeepSpeed

        deepspeed.comm.destroy_process_group()
    else:
        torch.distributed.destroy_process_group()


def shard_plan(accelerator: Any) -> ShardPlan | None:
    """The FSDP plan of this launch, or None when the model is replicated (one process or DDP)."""
    plugin = None
    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
    elif zero.env_true("ACCELERATE_USE_FSDP"):
        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables `accelerate launch` exported
    if plugin is None or accelerator.num_processes == 1:
        return None
    return plan_from_plugin(plugin)


def plan_from_plugin(plugin: Any) -> ShardPlan:
    """Accelerate's FullyShardedDataParallelPlugin (FSDP2 or FSDP1 settings) as our plan."""
    if plugin.fsdp_version == 2:
        reshard = bool(plugin.reshard_after_forward)
    else:  # an FSDP1 config: its sharding strategy names the same two choices
        strategy = getattr(plugin.sharding_strategy, "name", str(plugin.sharding_strategy))
        if strategy not in ("FULL_SHARD", "SHARD_GRAD_OP"):
            raise PrefalignError(f"sharding strategy {strategy} is not supported; use FULL_SHARD or SHARD_GRAD_OP",
                                 "fsdp_sharding_strategy")
        reshard = strategy == "FULL_SHARD"
    offload = type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy" or getattr(plugin.cpu_offload,
                                                                                  "offload_params", False) is True
    return ShardPlan(reshard, tuple(plugin.transformer_cls_names_to_wrap or ()), offload)


def _no_split_modules(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def shard(model: nn.Module, plan: ShardPlan, device: torch.device) -> nn.Module:
    """Shard `model` in place over all processes: one FSDP2 unit per decoder layer, the rest in the root unit.

    A model whose parts are called directly rather than through its own forward (PPO's policy + value) lists
    them in `fsdp_units()`; each becomes a root of its own, since a unit's weights are gathered by its forward."""
    classes = set(plan.wrap_classes) or _no_split_modules(model)
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise PrefalignError(f"no module of class {', '.join(sorted(classes)) or '(none given)'} to shard",
                             "fsdp_transformer_layer_cls_to_wrap")
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    offload = CPUOffloadPolicy() if plan.cpu_offload else OffloadPolicy()
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=plan.reshard_after_forward, offload_policy=offload)
    # The root unit (embeddings, final norm, LM head) stays gathered from forward to backward, FSDP2's own default
    # for a root: the log-prob path runs the LM head on the captured hidden states after the forward returns.
    units = model.fsdp_units() if hasattr(model, "fsdp_units") else [model]
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=False, offload_policy=offload)
    return model


def shard_reference(reference: Any, plan: ShardPlan, device: torch.device) -> None:
    """Shard a stage's separate frozen reference model like the policy (a reference that is the policy with its
    adapter off or switched is sharded already). Its forwards run once per micro-batch on every process, so the
    collectives pair up as the policy's do."""
    model = getattr(reference, "model", None)
    if isinstance(model, nn.Module) and not is_sharded(model):
        shard(model, plan, device)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule) or any(isinstance(m, FSDPModule) for m in model.modules())


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state to save (a collective when sharded: full tensors keyed by parameter name)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))


# How an optimizer computes, not what it has learnt: a resumed run keeps its own (--optim), where torch's
# load_state_dict would take them from the checkpoint's param groups.
IMPLEMENTATION_SETTINGS = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    chosen = [{k: g[k] for k in IMPLEMENTATION_SETTINGS if k in g} for g in optimizer.param_groups]
    if is_sharded(model):
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, chosen):
        group.update(settings)
        if settings.get("fused") or settings.get("capturable"):  # their kernels read the step on the device
            for param in group["params"]:
                step = optimizer.state.get(param, {}).get("step")
                if isinstance(step, torch.Tensor):
                    optimizer.state[param]["step"] = step.to(param.device, torch.float32)


def pad_groups(groups: Sequence[Sequence[int]], process_index: int,
               num_processes: int) -> list[tuple[Sequence[int], bool]]:
    """This process's share of `groups` as (group, counts) pairs. Every process runs the same number of
    micro-batches: sharded forwards hold collectives, and the replicated path's gradient all-reduce needs a gradient
    on every process. A process short of one re-runs the first group with `counts=False` (zero loss weight,
    metrics dropped)."""
    mine = [(g, True) for g in list(groups)[process_index::num_processes]]
    if groups:
        want = -(-len(groups) // num_processes)
        mine += [(groups[0], False)] * (want - len(mine))
    return mine


def no_weight(metrics: MetricSums) -> MetricSums:
    """A padding micro-batch's metrics: the same names (processes reduce one tensor of them), no contribution."""
    return {name: Extreme(v.kind, math.nan) if isinstance(v, Extreme) else (0.0, 0.0) for name, v in metrics.items()}


def grad_norm(norm: torch.Tensor) -> float:
    """clip_grad_norm_ returns a DTensor when parameters are sharded; the total is its full value."""
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def gather_rows(accelerator: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every process's rows of each tensor, concatenated in process order; every process holds the same number
    of rows, and a 2-D tensor's columns are zero-padded on the right to the widest process's. One process: as is."""
    if accelerator.num_processes == 1:
        return tensors
    out = {}
    for name, value in tensors.items():
        kind = value.dtype
        value = value.to(torch.long) if kind == torch.bool else value  # gloo gathers no bool
        if value.dim() > 1:
            value = accelerator.pad_across_processes(value.contiguous(), dim=1)
        out[name] = accelerator.gather(value.contiguous()).to(kind)
    return out


def all_finished(done: torch.Tensor) -> bool:
    """Whether every row of every process is done: a collective, so that sharded processes (whose forwards hold
    collectives) run the same number of decoding steps."""
    pending = (~done).any().to(torch.float32).reshape(1)
    torch.distributed.all_reduce(pending, op=torch.distributed.ReduceOp.MAX)
    return bool(pending.item() == 0)
