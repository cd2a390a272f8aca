"""Started once by a DeepSpeed test under `torchrun --nproc_per_node 2`: every run of a JSON plan, one after the
other, in this one launch (imports and the process group's start are most of a DeepSpeed run's time on CPU).

usage: deepspeed_runs.py PLAN.json
PLAN is a list of runs, each {"argv": [COMMAND, FLAGS...], "accelerate": CONFIG.yaml or null, "seed": DIR or
null}. "accelerate" runs it with the environment `accelerate launch --config_file CONFIG.yaml` exports (computed by
Accelerate's own launcher code); "seed" names a checkpoint directory copied into the run's --output_dir first (a
resumed run). A run that fails with a PrefalignError writes it to its --output_dir/error.txt and the plan goes on.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch.distributed as dist

from prefalign.argparsing import parse_config
from prefalign.commands import config_class, runner
from prefalign.errors import PrefalignError
from prefalign.train.distributed import close_process_group


def accelerate_env(config: str) -> dict[str, str]:
    """What `accelerate launch --config_file CONFIG --num_processes 2` exports for DeepSpeed (one machine: it runs
    torch.distributed.run itself, with these variables)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", config, "--num_processes", "2", "x.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    fields = list(defaults.deepspeed_config) if defaults else []
    args.deepspeed_fields_from_accelerate_config = ",".join(fields + (["mixed_precision"] if mp_from_config else []))
    cmd, env = prepare_deepspeed_cmd_env(args)
    assert cmd is None  # one machine: no `deepspeed` launcher command
    return {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}


def run(argv: list[str], env: dict[str, str]) -> None:
    """The command through the Python API (the CLI would close the process group at its end)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        runner(argv[0])(parse_config(config_class(argv[0]), argv[1:], prog=f"prefalign {argv[0]}"))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _barrier() -> None:
    if dist.is_initialized():  # the first run starts the process group
        dist.barrier()


def one_run(spec: dict) -> None:
    argv = spec["argv"]
    out = Path(argv[argv.index("--output_dir") + 1])
    main = os.environ.get("RANK", "0") == "0"
    if spec.get("seed") and main:
        shutil.copytree(spec["seed"], out / Path(spec["seed"]).name)
    _barrier()
    started = time.perf_counter()
    try:
        run(argv, accelerate_env(spec["accelerate"]) if spec.get("accelerate") else {})
    except PrefalignError as e:  # a refusal the test asserts on (every process raises it alike)
        if main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "error.txt").write_text(str(e))
    _barrier()
    if main:  # what a run costs once the launch's imports are paid (the README quotes these)
        print(f"deepspeed_runs: {argv[0]} -> {out.name} in {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    for spec in json.loads(Path(sys.argv[1]).read_text()):
        one_run(spec)
    close_process_group()
