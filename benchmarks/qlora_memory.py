"""LoRA on a float32 base against QLoRA (nf4 base): peak RSS, seconds per step and step-1 log-probs of `prefalign dpo`.

Each run is its own process, its RSS sampled every 0.1 s: the peak over the whole run (loading included: a 4-bit
load reads the float32 shards before quantizing them) and the peak once training has logged its first step. Run with
MALLOC_MMAP_THRESHOLD_=65536 so that freed memory goes back to the OS. The model is a Hugging Face directory or a
GGUF file (dequantized and, for 4 bits, requantized through a temporary directory on the way); the default is the
SmolLM2-135M-Instruct directory `make demo-real` writes (runs/demo-real/base) and its pairs.

    python benchmarks/qlora_memory.py [--model runs/demo-real/base] [--data runs/demo-real/data/pairs.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
CONFIGS = {"lora-fp32": [], "qlora-nf4": ["--load_in_4bit"]}


def run(name: str, model: str, data: str, out: Path, steps: int, batch: int) -> dict:
    import psutil  # the bench extra

    cmd = [sys.executable, "-m", "prefalign.cli", "dpo", "--model_name_or_path", model,
           "--dataset_name", data, "--use_peft", "--lora_r", "16", "--max_steps", str(steps),
           "--per_device_train_batch_size", str(batch), "--max_length", "160", "--logging_steps", "1",
           "--learning_rate", "1e-4", "--save_steps", "0", "--disable_tqdm", "--seed", "0",
           "--output_dir", str(out / name), *CONFIGS[name]]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MALLOC_MMAP_THRESHOLD_": "65536"}
    metrics = out / name / "metrics.jsonl"
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        watched = psutil.Process(proc.pid)
        peak = training_peak = 0
        while proc.poll() is None:  # RSS sampled every 0.1 s; "training" once the first step is logged
            try:
                rss = watched.memory_info().rss
            except psutil.NoSuchProcess:
                break
            peak = max(peak, rss)
            if metrics.is_file() and metrics.stat().st_size:
                training_peak = max(training_peak, rss)
            time.sleep(0.1)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed: see {out / f'{name}.log'}\n" + (out / f"{name}.log").read_text()[-2000:])
    train = [r for r in (json.loads(line) for line in metrics.open()) if "loss" in r and "pairs/s" in r]
    return {"config": name, "peak_rss_mb": peak / 2**20, "training_rss_mb": training_peak / 2**20, "wall_s": wall,
            "s_per_step": sum(batch / r["pairs/s"] for r in train[1:]) / max(len(train) - 1, 1),
            "logps/chosen": train[0]["logps/chosen"], "logps/rejected": train[0]["logps/rejected"],
            "loss_last": train[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "runs/demo-real/base"))
    parser.add_argument("--data", default=str(ROOT / "runs/demo-real/data/pairs.jsonl"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(name, args.model, args.data, Path(tmp), args.steps, args.batch) for name in CONFIGS]
    print("| config | peak RSS (MB) | peak RSS while training (MB) | wall (s) | s per step (after the first) | "
          "step-1 logps chosen / rejected | loss at last step |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['peak_rss_mb']:.0f} | {r['training_rss_mb']:.0f} | {r['wall_s']:.0f} | "
              f"{r['s_per_step']:.2f} | {r['logps/chosen']:.2f} / {r['logps/rejected']:.2f} | {r['loss_last']:.3f} |")


if __name__ == "__main__":
    main()
