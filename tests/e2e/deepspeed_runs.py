"""Started once by tests/e2e/test_deepspeed.py under `torchrun --nproc_per_node 2`: for each DeepSpeed config named
on the command line, a DPO run with a checkpoint at step 2, then a run resumed from a copy of that checkpoint, all
in this one launch (imports and process-group start are most of a DeepSpeed run's time on CPU).

usage: deepspeed_runs.py OUT_DIR CONFIG[,EXTRA_FLAG...] ... -- DPO_FLAGS...
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from prefalign.argparsing import parse_config
from prefalign.commands import config_class, runner


def run(argv: list[str]) -> None:
    """The command through the Python API: the process group stays up between runs (the CLI would close it)."""
    runner(argv[0])(parse_config(config_class(argv[0]), argv[1:], prog=f"prefalign {argv[0]}"))


def one_config(out: Path, spec: str, flags: list[str]) -> None:
    config, *extra = spec.split(",")
    name = "_".join(Path(part).stem.lstrip("-") for part in spec.split(","))
    full, resumed = out / name / "full", out / name / "resumed"
    run([*flags, *extra, "--deepspeed", config, "--output_dir", str(full)])
    if dist.get_rank() == 0:
        shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    dist.barrier()
    run([*flags, *extra, "--deepspeed", config, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])


if __name__ == "__main__":
    args = sys.argv[1:]
    cut = args.index("--")
    out_dir, specs, dpo_flags = Path(args[0]), args[1:cut], args[cut + 1:]
    for spec in specs:
        one_config(out_dir, spec, dpo_flags)
    from prefalign.train.distributed import close_process_group

    close_process_group()
