"""DeepSpeed ZeRO-2 / ZeRO-3 as the engine of the one training loop, through Accelerate's DeepSpeed plugin.

Asked for like TRL / transformers users do: `--deepspeed ds_config.json` (or one of our presets `zero2`, `zero3`,
`zero3_offload`), or `accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml`. Processes come from
torchrun or accelerate launch; on a machine without GPU the process group is gloo.

What the loop keeps and what DeepSpeed gets (measured with deepspeed 0.19.8 on CPU, see README):
* the loop keeps its own data split, loss normalisation, AdamW (a torch optimizer: no JIT-built DeepSpeed Adam)
  and learning-rate schedule; DeepSpeed gets `gradient_accumulation_steps: 1` and is told where the optimizer step's
  last micro-batch is (`set_gradient_accumulation_boundary`), so B x A is still A·B x 1;
* DeepSpeed owns backward (gradient reduction / partitioning), clipping at `--max_grad_norm` (its own default
  would be 1.0 whatever the flag says) and the optimizer step;
* the values the loop owns (micro-batch size, accumulation, clipping, precision) come from the flags; a config
  file that says otherwise is a one-line error, "auto" is filled in;
* models are built whole (transformers' zero.Init is switched off) and partitioned by `deepspeed.initialize`, so
  loading, LoRA, resumed weights and the frozen reference copy work as without DeepSpeed;
* the online stages sample under ZeRO-3 with the policy's weights gathered once per rollout (`generation_weights`).

DeepSpeed is an optional extra: it is imported only when asked for (`import_deepspeed`). The optimizer state in
torch's layout is `train/zero_state.py`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import sys
import warnings
import weakref
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from prefalign.errors import PrefalignError

# ZeRO-3's bucket sizes "auto": Accelerate sizes them from the model's hidden size (DeepSpeed's own defaults are
# buffers of up to 5e8 elements: +274 MB peak per process measured on a 43M model, benchmarks/RESULTS.md)
_Z3_BUCKETS = {"reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
               "stage3_param_persistence_threshold": "auto", "stage3_gather_16bit_weights_on_model_save": True}
PRESETS: dict[str, dict[str, Any]] = {
    "zero2": {"zero_optimization": {"stage": 2}},
    "zero3": {"zero_optimization": {"stage": 3, **_Z3_BUCKETS}},
    "zero3_offload": {"zero_optimization": {"stage": 3, **_Z3_BUCKETS, "offload_optimizer": {"device": "cpu"},
                                            "offload_param": {"device": "cpu"}}},
}
FLAG = "--deepspeed"


def env_true(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def requested(args: Any) -> bool:
    """Whether this run trains under DeepSpeed: --deepspeed, or an accelerate config with distributed_type
    DEEPSPEED (`accelerate launch` exports ACCELERATE_USE_DEEPSPEED)."""
    return bool(getattr(args, "deepspeed", None)) or env_true("ACCELERATE_USE_DEEPSPEED")


def is_engine(model: Any) -> bool:
    """Whether `model` is a DeepSpeedEngine (without importing DeepSpeed when nobody did)."""
    ds = sys.modules.get("deepspeed")
    return ds is not None and isinstance(model, ds.DeepSpeedEngine)


def owns_process_group() -> bool:
    """Whether DeepSpeed's communication layer was set up (by a DeepSpeed run); merely importing DeepSpeed, as
    transformers' save_pretrained does, sets up nothing."""
    comm = sys.modules.get("deepspeed.comm")
    return comm is not None and getattr(comm, "cdb", None) is not None


def no_gpu() -> bool:
    return not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()))


def name_cpu_accelerator() -> None:
    """Without a GPU, name DeepSpeed's CPU accelerator up front: otherwise DeepSpeed warns "Setting accelerator to
    CPU" when imported, which transformers' save_pretrained does whenever DeepSpeed is installed."""
    if no_gpu():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def import_deepspeed() -> Any:
    """Import DeepSpeed quietly (`name_cpu_accelerator`). Without a GPU its shared-memory all-reduce op is not
    built: a just-in-time C++ build of about 107 s on a fresh machine at every start, which only speeds up
    all_reduce (gloo does it)."""
    name_cpu_accelerator()
    try:
        import deepspeed  # optional extra: only imported for a DeepSpeed run
        import deepspeed.ops
    except ImportError:
        raise PrefalignError("DeepSpeed is not installed: pip install 'prefalign[deepspeed]'", FLAG) from None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # gloo's collectives under their older names, called by DeepSpeed on every step
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)"
                            r"` is deprecated", category=FutureWarning)
    if no_gpu():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def check_launch() -> None:
    """Settings that would silently drop DeepSpeed: Accelerate's CPU mode runs plain data parallel instead."""
    if env_true("ACCELERATE_USE_CPU"):
        raise PrefalignError("DeepSpeed cannot run in Accelerate's CPU mode (it would silently train without "
                             "DeepSpeed); drop --cpu / use_cpu, prefalign picks gloo itself on a machine without GPU",
                             "accelerate config")


def read_config(spec: str) -> dict[str, Any]:
    """The DeepSpeed config a --deepspeed value names: a preset or a JSON file (one-line errors)."""
    if spec in PRESETS:
        return copy.deepcopy(PRESETS[spec])
    path = Path(spec)
    if not path.is_file():
        raise PrefalignError(f"no such file (and not one of {', '.join(PRESETS)})", f"{FLAG} {spec}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PrefalignError(f"not valid JSON ({e.msg})", f"{spec}:{e.lineno}") from None
    except UnicodeDecodeError:
        raise PrefalignError("not a text (JSON) file", spec) from None
    if not isinstance(cfg, dict):
        raise PrefalignError("a DeepSpeed config must be a JSON object", spec)
    return cfg


def _owned(cfg: dict[str, Any], key: str, value: Any, flag: str, where: str) -> None:
    """Set a value the loop owns; a config that sets it otherwise is an error naming both."""
    given = cfg.get(key, "auto")
    if given != "auto" and given != value:
        raise PrefalignError(f"{key} is {given!r} but {flag} gives {value!r}; set it to \"auto\" (the flag decides)",
                             where)
    cfg[key] = value


def loop_config(cfg: dict[str, Any], args: Any, where: str) -> dict[str, Any]:
    """`cfg` with what the loop owns filled in from the flags (see the module docstring)."""
    cfg = copy.deepcopy(cfg)
    for section, flags in (("optimizer", "--learning_rate, --adam_beta1/2, --weight_decay"),
                           ("scheduler", "--lr_scheduler_type, --warmup_steps")):
        if section in cfg:
            raise PrefalignError(f"has a \"{section}\" section; prefalign runs its own AdamW and schedule, set "
                                 f"by {flags}: remove it", where)
    zero = cfg.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (1, 2, 3):
        raise PrefalignError(f"zero_optimization.stage is {stage!r}; prefalign runs ZeRO stage 1, 2 or 3", where)
    _owned(cfg, "train_micro_batch_size_per_gpu", args.per_device_train_batch_size, "--per_device_train_batch_size",
           where)
    cfg.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the process count
    _owned(cfg, "gradient_accumulation_steps", args.gradient_accumulation_steps, "--gradient_accumulation_steps",
           where)
    cfg["gradient_accumulation_steps"] = 1  # the loop accumulates and marks the optimizer step's boundary itself
    _owned(cfg, "gradient_clipping", float(args.max_grad_norm or 0.0), "--max_grad_norm", where)
    for key, flag in (("bf16", "--bf16"), ("fp16", "--fp16")):
        section = cfg.setdefault(key, {})
        enabled = section.get("enabled", "auto")
        if enabled != "auto" and bool(enabled) != bool(getattr(args, key)):
            raise PrefalignError(f"{key}.enabled is {enabled!r} but {flag} is {'' if getattr(args, key) else 'not '}"
                                 "given; set it to \"auto\" (the flag decides)", where)
        section["enabled"] = bool(getattr(args, key))
    # A torch optimizer (the loop's AdamW) also under optimizer offload: DeepSpeed's CPU Adam is a C++ build
    # (about 121 s here) and would replace the optimizer the loop configured.
    cfg["zero_allow_untested_optimizer"] = True
    cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    cfg.setdefault("steps_per_print", 10**9)  # the loop logs; DeepSpeed's own step lines are noise
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def single_process_env() -> None:
    """DeepSpeed needs a process group even for one process: started without a launcher, this process is rank 0 of
    1 on a free local port."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"})


def make_plugin(args: Any) -> Any:
    """Accelerate's DeepSpeedPlugin for this run: from --deepspeed, else from what `accelerate launch` exported."""
    spec = getattr(args, "deepspeed", None)
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    cfg = None
    if spec:
        cfg, where = read_config(spec), f"{FLAG} {spec}" if spec in PRESETS else spec
    elif config_file != "none":
        cfg, where = read_config(config_file), config_file
    if cfg is not None:  # checked before DeepSpeed is imported (seconds)
        cfg = loop_config(cfg, args, where)
    import_deepspeed()
    single_process_env()
    from accelerate.utils import DeepSpeedPlugin

    if cfg is None:  # the accelerate config's deepspeed_config fields, as Accelerate itself turns them into a config
        cfg = DeepSpeedPlugin(zero3_init_flag=False).deepspeed_config
        if cfg.get("zero_optimization", {}).get("stage") == 3:  # an accelerate config names no bucket sizes
            for key, value in _Z3_BUCKETS.items():
                cfg["zero_optimization"].setdefault(key, value)
        cfg = loop_config(cfg, args, "accelerate config")
    # hf_ds_config is a dict here, so Accelerate's own env-var defaults do not apply on top of it; Accelerate would
    # refuse it next to the accelerate config's deepspeed fields, which are in `cfg` already
    fields = os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
    try:
        return DeepSpeedPlugin(hf_ds_config=cfg, zero3_init_flag=False)
    finally:
        if fields is not None:
            os.environ["ACCELERATE_CONFIG_DS_FIELDS"] = fields


def after_accelerator(accelerator: Any) -> None:
    """Checks and settings once Accelerate has started DeepSpeed's process group."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # Accelerate registers the ZeRO-3 config with transformers, which would then build every model under
    # zero.Init (partitioned at construction): models are built whole, deepspeed.initialize partitions them.
    unset_hf_deepspeed_config()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != world:  # Accelerate without a backend counts one process on every rank
        raise PrefalignError(f"Accelerate sees {accelerator.num_processes} process(es) of {world}", "accelerate config")


def active(accelerator: Any) -> bool:
    """Whether `accelerator` was set up with DeepSpeed (`make_plugin`)."""
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


def stage_of(accelerator: Any) -> int:
    """The ZeRO stage of this run (0 without DeepSpeed)."""
    return int(accelerator.state.deepspeed_plugin.zero_stage) if active(accelerator) else 0


def describe(accelerator: Any) -> str:
    """The start block's line: the ZeRO stage and what is offloaded."""
    cfg = accelerator.state.deepspeed_plugin.deepspeed_config
    zero = cfg.get("zero_optimization", {})
    offload = [what for what in ("optimizer", "param")
               if zero.get(f"offload_{what}", {}).get("device", "none") not in (None, "none")]
    text = f"ZeRO-{stage_of(accelerator)}"
    if offload:
        text += f", {' and '.join('parameters' if w == 'param' else w for w in offload)} offloaded to CPU"
    return text


# each prepared model -> its engine: sampling code holds the module (a rollout's policy), the engine's hooks are
# what a ZeRO-3 generation must take off (`generation_weights`); weak, so a finished run's engine is not kept
_ENGINES: weakref.WeakKeyDictionary[torch.nn.Module, Any] = weakref.WeakKeyDictionary()


def _hidden_size_buckets(plugin: Any, model: torch.nn.Module) -> None:
    """ZeRO-3's "auto" bucket sizes for a model without `config` (PPO's policy + value): Accelerate sizes them
    from `model.config.hidden_size` and refuses a model without one; here from the largest hidden size of the
    Hugging Face models inside, with Accelerate's formulas (h², 0.9·h², 10·h)."""
    from transformers import PreTrainedModel

    zero = plugin.deepspeed_config.get("zero_optimization", {})
    keys = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")
    if hasattr(model, "config") or not any(zero.get(k) == "auto" for k in keys):
        return
    sizes = [m.config.get_text_config().hidden_size for m in model.modules() if isinstance(m, PreTrainedModel)]
    if not sizes:
        return  # Accelerate's own error names the keys to set
    h = max(sizes)
    for key, value in zip(keys, (h * h, int(0.9 * h * h), 10 * h)):
        if zero.get(key) == "auto":
            zero[key] = value


def prepare(accelerator: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    """The DeepSpeedEngine around `model` and the loop's AdamW (parameters partitioned in place under ZeRO-3)."""
    _hidden_size_buckets(accelerator.state.deepspeed_plugin, model)
    engine, _ = accelerator.prepare(model, optimizer)
    _ENGINES[model] = engine
    return engine


def _engine_holding(module: torch.nn.Module) -> Any:
    """The ZeRO-3 engine whose model is `module` or contains it, else None."""
    for root, engine in list(_ENGINES.items()):
        if engine.zero_optimization_stage() == 3 and any(m is module for m in root.modules()):
            return engine
    return None


def generation_weights(module: torch.nn.Module) -> Any:
    """A context in which `module` (a policy being trained) generates. Under ZeRO-3 its weights are partitioned and
    every forward would all-gather each layer, a collective per layer and token that also ties the processes'
    decoding steps together; DeepSpeed's `unwrap_model_for_generation` gathers the whole engine's weights once
    and takes its partitioning hooks off until the context ends (so each process holds the full model while it
    samples, as TRL does). Without ZeRO-3: nothing to do."""
    engine = _engine_holding(module)
    if engine is None:
        return nullcontext()
    from deepspeed.runtime.zero import unwrap_model_for_generation

    return unwrap_model_for_generation(engine)


def backward(engine: Any, loss: torch.Tensor, last: bool) -> None:
    """Backward of one micro-batch; DeepSpeed reduces the gradients at the optimizer step's last one. The loss is
    already scaled by the loop (scale_wrt_gas=False: DeepSpeed must not divide by its accumulation count)."""
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss, scale_wrt_gas=False)


def step(engine: Any) -> float:
    """Clip at --max_grad_norm, AdamW step, zero the gradients; the global gradient norm before clipping."""
    engine.step()
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")
