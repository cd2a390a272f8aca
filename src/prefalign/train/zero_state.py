"""The loop's AdamW state inside a DeepSpeed ZeRO engine (`train/zero.py`), read and written in torch's own
`state_dict()` layout: a checkpoint of a ZeRO run does not depend on the process count or on DeepSpeed, and one
saved by torch's AdamW resumes under ZeRO (measured with deepspeed 0.19.8, see README)."""

from __future__ import annotations

from typing import Any

import torch


def _base_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The loop's torch AdamW inside DeepSpeed's ZeRO optimizer (it steps on DeepSpeed's flat fp32 partitions)."""
    return engine.optimizer.optimizer


def _link_state(engine: Any) -> None:
    """ZeRO-1/2 (deepspeed 0.19.8) links each parameter to its slice of the optimizer state once, after the first
    param group's first step, so the parameters of our second group (no weight decay) stay unlinked and
    safe_get_full_optimizer_state raises "exp_avg not found". Link again (ZeRO-3 has no such cache)."""
    ds_opt = engine.optimizer
    if hasattr(ds_opt, "_hp_optimizer_states_linked"):
        ds_opt._hp_optimizer_states_linked = False
        ds_opt._lazy_init_hp_params_optimizer_state()


def optimizer_state(engine: Any, groups: list[list[torch.nn.Parameter]]) -> dict[str, Any]:
    """The full (unpartitioned) AdamW state in torch's own `state_dict()` layout, parameters numbered over the
    loop's param groups `groups` as torch numbers them: a checkpoint that does not depend on the process count or
    on DeepSpeed. Every process must call this (each gather is a collective); the tensors are on CPU."""
    from deepspeed.utils import safe_get_full_optimizer_state

    base = _base_optimizer(engine)
    steps = {float(s["step"]) for s in base.state.values() if "step" in s}
    if len(steps) > 1:
        raise RuntimeError(f"optimizer partitions at different steps: {sorted(steps)}")
    step_count = steps.pop() if steps else 0.0
    _link_state(engine)
    state: dict[int, dict[str, torch.Tensor]] = {}
    param_groups = []
    index = 0
    for group, params in zip(base.param_groups, groups):
        numbers = list(range(index, index + len(params)))
        index += len(params)
        param_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": numbers})
        if not step_count:
            continue  # no step yet: torch keeps no per-parameter state either
        for number, param in zip(numbers, params):
            state[number] = {"step": torch.tensor(step_count, dtype=torch.float32)}
            for key in ("exp_avg", "exp_avg_sq"):
                state[number][key] = safe_get_full_optimizer_state(param, key).detach().cpu().clone()
    return {"state": state, "param_groups": param_groups}


def load_optimizer_state(engine: Any, groups: list[list[torch.nn.Parameter]], saved: dict[str, Any]) -> None:
    """Put a state saved by `optimizer_state` (or by torch's AdamW over the same param groups) into the engine's
    partitions; the learning rates of the param groups come back too, as torch's load_state_dict does."""
    from deepspeed.utils import safe_set_full_optimizer_state

    base = _base_optimizer(engine)
    saved_groups = saved["param_groups"]
    if len(saved_groups) != len(groups) or any(len(g["params"]) != len(p) for g, p in zip(saved_groups, groups)):
        raise ValueError("loaded state dict has a different number of parameter groups or parameters")
    states = {int(k): v for k, v in saved["state"].items()}
    steps = {float(s["step"]) for s in states.values()}
    if len(steps) > 1:
        raise ValueError(f"parameters saved at different steps: {sorted(steps)}")
    for group, was in zip(base.param_groups, saved_groups):
        group["lr"] = was["lr"]
        if "initial_lr" in was:
            group["initial_lr"] = was["initial_lr"]
    if not steps:
        return
    step_count = steps.pop()
    # torch AdamW creates its state at the first step: create it for DeepSpeed's flat fp32 partitions (ZeRO-3
    # steps each of its sub-groups by pointing the param group at it, so its param groups do not list them)
    ds_opt = engine.optimizer
    flats = getattr(ds_opt, "fp32_partitioned_groups_flat", None) or ds_opt.single_partition_of_fp32_groups
    for flat in flats:
        base.state[flat] = {"step": torch.tensor(step_count, dtype=torch.float32),
                            "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    _link_state(engine)
    for was, params in zip(saved_groups, groups):
        for number, param in zip(was["params"], params):
            for key in ("exp_avg", "exp_avg_sq"):
                value = states[number][key]
                if tuple(value.shape) != tuple(getattr(param, "ds_shape", param.shape)):  # ds_shape: ZeRO-3's full
                    raise ValueError(f"size mismatch for parameter {number}: {tuple(value.shape)}")
                safe_set_full_optimizer_state(param, value.to(param.device), key)
