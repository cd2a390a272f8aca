"""Started once by tests/e2e/test_deepspeed.py under `torchrun --nproc_per_node 2`: for each DeepSpeed setting named
on the command line, a DPO run with a checkpoint at step 2, then a run resumed from a copy of that checkpoint, all
in this one launch (imports and the process group's start are most of a DeepSpeed run's time on CPU).

usage: deepspeed_runs.py OUT_DIR SPEC ... -- COMMAND FLAGS...
SPEC is NAME=flag:VALUE (`--deepspeed VALUE`) or NAME=accelerate:CONFIG.yaml (the environment `accelerate launch
--config_file CONFIG.yaml` exports, computed by Accelerate's own launcher code), then ",EXTRA,FLAGS" for that run.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from prefalign.argparsing import parse_config
from prefalign.commands import config_class, runner
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


def one_setting(out: Path, spec: str, flags: list[str]) -> None:
    name, rest = spec.split("=", 1)
    setting, *extra = rest.split(",")
    kind, value = setting.split(":", 1)
    env = accelerate_env(value) if kind == "accelerate" else {}
    use = ["--deepspeed", value] if kind == "flag" else []
    full, resumed = out / name / "full", out / name / "resumed"
    run([*flags, *extra, *use, "--output_dir", str(full)], env)
    if dist.get_rank() == 0:
        shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    dist.barrier()
    run([*flags, *extra, *use, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"], env)


if __name__ == "__main__":
    args = sys.argv[1:]
    cut = args.index("--")
    for one in args[1:cut]:
        one_setting(Path(args[0]), one, args[cut + 1:])
    close_process_group()
