"""Peak RSS per process of DPO under each data-parallel layout, 2 processes under torchrun (gloo on CPU).

The model of the FSDP table in RESULTS.md: a 42.8M-parameter Qwen2 (hidden 768, 6 layers, 12 heads, vocab 400),
fp32, full weights trained, the frozen reference a copy of the policy; batch 2 per process, 2 steps, run with
MALLOC_MMAP_THRESHOLD_=65536 so that freed memory goes back to the OS. Peak is `/usr/bin/time -v`'s maximum RSS
(the larger of the two processes).

    python benchmarks/distributed_memory.py --layouts ddp zero2 zero3 [--out /tmp/distmem]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "tests"))

LAYOUTS = {  # name -> (extra CLI flags, environment)
    "ddp": ([], {}),
    "zero2": (["--deepspeed", "zero2"], {}),
    "zero3": (["--deepspeed", "zero3"], {}),
    "zero3_offload": (["--deepspeed", "zero3_offload"], {}),
}


def build(out: Path) -> tuple[Path, Path]:
    from helpers import build_tokenizer, conv, write_jsonl
    from prefalign.config.tools import ModelShape
    from prefalign.model.init import init_model

    model_dir = out / "model"
    tok = build_tokenizer(model_dir)
    shape = ModelShape(architecture="qwen2", hidden_size=768, num_hidden_layers=6, num_attention_heads=12,
                       num_key_value_heads=12, max_position_embeddings=512)
    init_model(shape, tok, seed=0).save_pretrained(model_dir)
    rows = [{"prompt": conv(("user", f"what is {i} plus {i + 1} and why")),
             "chosen": conv(("assistant", f"{2 * i + 1} because adding")), "rejected": conv(("assistant", "no"))}
            for i in range(8)]
    return model_dir, write_jsonl(out / "pairs.jsonl", rows)


def run(layout: str, model_dir: Path, data: Path, out: Path) -> dict:
    flags, env = LAYOUTS[layout]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = ["/usr/bin/time", "-v", torchrun, "--nproc_per_node", "2", "-m", "prefalign.cli", "dpo",
           "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--max_steps", "2",
           "--per_device_train_batch_size", "2", "--logging_steps", "1", "--disable_tqdm", "--save_steps", "0",
           "--output_dir", str(out / layout), *flags]
    full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
                "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    # /usr/bin/time reports the largest RSS of the process tree's biggest member (a worker, not torchrun)
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time .*: (\S+)", done.stderr).group(1)
    rows = [json.loads(line) for line in (out / layout / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]
    return {"layout": layout, "peak_rss_mb": round(peak_kb / 1024), "wall": wall, "loss": last["loss"],
            "rewards/margins": last["rewards/margins"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", default=["ddp", "zero2", "zero3"], choices=list(LAYOUTS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="distmem"))
    out.mkdir(parents=True, exist_ok=True)
    model_dir, data = build(out)
    for layout in args.layouts:
        print(json.dumps(run(layout, model_dir, data, out)), flush=True)


if __name__ == "__main__":
    main()
