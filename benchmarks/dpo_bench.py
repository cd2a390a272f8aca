"""One DPO training step, three ways: prefalign padded, prefalign packed + shared prompt, and TRL's DPOTrainer.

A step = policy forward + backward, reference forward (no grad), AdamW step, for `--batch` pairs, fp32, no
gradient checkpointing, the same randomly initialised Qwen2 (~45M parameters: hidden 512, 4 layers, vocab
32k, untied head) and the same token ids for every configuration. Data is generated on the spot:

- long:  multi-turn-like, ~530 prompt tokens and ~90-token answers (hh-rlhf-like);
- short: ~150 prompt tokens, ~250-token answers (UltraFeedback-like).

TRL gets the same ids through a word-level tokenizer whose tokens are "w3".."w31999", so its own
tokenization reproduces them exactly (checked). Every configuration runs in its own subprocess, so the peak
RSS (ru_maxrss) is that configuration's alone. Efficiency = useful FLOPs/s / measured fp32 matmul peak, with
useful FLOPs = 6 x matmul params x unique tokens (policy) + 2 x matmul params x unique tokens (reference),
where unique tokens count each pair's prompt once; padding and repeated prompts are not useful work.

The memory-budget test: the budget is TRL's peak RSS for one pair of `--budget-length` tokens; each
prefalign path is run on growing lengths and the longest one that stays within the budget is reported.

    python benchmarks/dpo_bench.py --quick      # smoke test, < 1 minute
    python benchmarks/dpo_bench.py              # full run (minutes on a small CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BETA = 0.1
CONFIGS = ("prefalign-padded", "prefalign-packed", "trl")


@dataclass
class Shape:
    name: str
    prompt: int  # mean prompt tokens
    answer: int  # mean answer tokens (chosen and rejected each)


@dataclass
class ModelSize:
    vocab: int = 32000
    hidden: int = 512
    layers: int = 4
    heads: int = 8
    intermediate: int = 1408
    max_positions: int = 8192


FULL_SHAPES = [Shape("long", 530, 90), Shape("short", 150, 250)]
QUICK_SHAPES = [Shape("long", 96, 16), Shape("short", 24, 40)]
QUICK_MODEL = ModelSize(vocab=2000, hidden=64, layers=2, heads=4, intermediate=176, max_positions=1024)


# ---------------------------------------------------------------- data and model (identical in every child)


def make_pairs(shape: Shape, n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """n pairs of token ids (eos not included); lengths vary +-25% around the shape's means."""
    rng = random.Random(seed)

    def ids(mean: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(rng.randint(int(mean * 0.75), int(mean * 1.25)))]

    return [(ids(shape.prompt), ids(shape.answer), ids(shape.answer)) for _ in range(n)]


def build_model(size: ModelSize):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
        max_position_embeddings=size.max_positions, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def matmul_params(model) -> int:
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def unique_tokens(pairs) -> int:
    return sum(len(p) + len(c) + len(r) + 2 for p, c, r in pairs)  # +2: the eos of each answer


# ---------------------------------------------------------------- the configurations (run in a child)


def run_prefalign(model, pairs, batch: int, steps: int, layout: str) -> list[float]:
    import copy

    import torch

    import prefalign.model.packed  # noqa: F401  (registers the packed layout)
    from prefalign.data.collate import collate_padded
    from prefalign.data.packing import collate_packed
    from prefalign.data.types import TokenizedPair
    from prefalign.model.logprobs import completion_logps

    reference = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    tokenized = [TokenizedPair(p, c + [1], r + [1]) for p, c, r in pairs]
    times = []
    for step in range(steps):
        chunk = tokenized[step * batch : (step + 1) * batch]
        start = time.perf_counter()
        data = collate_padded(chunk, 0) if layout == "padded" else collate_packed(chunk, 0, share_prompt=True)
        policy = completion_logps(model, data).token_logps.sum(1)  # (2B,)
        with torch.no_grad():
            ref = completion_logps(reference, data).token_logps.sum(1)
        b = data["num_pairs"]
        loss = -torch.nn.functional.logsigmoid(BETA * ((policy[:b] - ref[:b]) - (policy[b:] - ref[b:]))).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def word_tokenizer(vocab: int):
    """Tokens "<pad>", "<eos>", "<unk>", then "w3".."w{vocab-1}", split on spaces, so ids come back exactly."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"w{i}": i for i in range(3, vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def run_trl(model, pairs, batch: int, steps: int) -> list[float]:
    import copy

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    def text(ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids)

    rows = [{"prompt": text(p), "chosen": " " + text(c), "rejected": " " + text(r)} for p, c, r in pairs]
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-6, beta=BETA,
            max_length=None, gradient_checkpointing=False, use_cpu=True, report_to=[], save_strategy="no",
            logging_strategy="no", dataloader_num_workers=0, disable_tqdm=True, seed=0,
        )  # fmt: skip
        tokenizer = word_tokenizer(model.config.vocab_size)
        # An explicit reference copy, as prefalign's runs get: left to itself TRL reloads the reference from
        # config._name_or_path, which a model built from a config does not have.
        reference = copy.deepcopy(model).eval()
        trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[StepTimer()])  # fmt: skip
        first = trainer.train_dataset[0]
        p, c, r = pairs[0]
        if (first["prompt_ids"], first["chosen_ids"], first["rejected_ids"]) != (p, c + [1], r + [1]):
            raise RuntimeError("TRL tokenized the benchmark data differently from prefalign's ids")
        trainer.train()
    return times


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration; report step times and this process's peak RSS."""
    import torch

    size = ModelSize(**spec["model"])
    shape = Shape(**spec["shape"])
    batch, steps = spec["batch"], spec["warmup"] + spec["steps"]
    model = build_model(size)
    pairs = make_pairs(shape, batch * steps, size.vocab, seed=spec.get("seed", 0))
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if spec["config"] == "trl":
        times = run_trl(model, pairs, batch, steps)
    else:
        times = run_prefalign(model, pairs, batch, steps, spec["config"].removeprefix("prefalign-"))
    timed = times[spec["warmup"] :]
    result = {
        "seconds_per_step": sum(timed) / len(timed),
        "unique_tokens_per_step": unique_tokens(pairs[spec["warmup"] * batch :]) / spec["steps"],
        "matmul_params": matmul_params(model),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_model_mb": rss_model,
    }
    if torch.cuda.is_available():
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


IN_PROCESS = False  # --quick: no subprocesses (their start-up alone takes a minute); RSS is then shared


def spawn(spec: dict[str, Any]) -> dict[str, Any]:
    if IN_PROCESS:
        try:
            return child(spec)
        except Exception as error:  # noqa: BLE001  (reported in the table)
            return {"error": f"{type(error).__name__}: {error}"}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the parent: tables


def matmul_peak_flops(n: int = 1024, reps: int = 10) -> float:
    """Best-of fp32 matmul FLOP/s on this machine with torch's default threads."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def throughput_table(args, size: ModelSize, shapes: list[Shape], peak: float) -> list[str]:
    lines = ["| shape | config | pairs/s | unique tok/s | s/step | peak RSS (MB) | efficiency | vs TRL pairs/s | vs TRL RSS |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for shape in shapes:
        results = {}
        for config in CONFIGS:
            spec = {"config": config, "model": asdict(size), "shape": asdict(shape), "batch": args.batch,
                    "warmup": args.warmup, "steps": args.steps}  # fmt: skip
            results[config] = spawn(spec)
            print(f"  {shape.name} {config}: {results[config]}", file=sys.stderr)
        trl = results["trl"]
        for config, r in results.items():
            if "error" in r:
                lines.append(f"| {shape.name} | {config} | error: {r['error']} | | | | | | |")
                continue
            pairs_s = args.batch / r["seconds_per_step"]
            useful = 8 * r["matmul_params"] * r["unique_tokens_per_step"] / r["seconds_per_step"]
            vs = ("", "")
            if "error" not in trl:
                vs = (f"{trl['seconds_per_step'] / r['seconds_per_step']:.2f}x",
                      f"{r['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x")  # fmt: skip
            lines.append(
                f"| {shape.name} | {config} | {pairs_s:.3f} | {r['unique_tokens_per_step'] / r['seconds_per_step']:.0f} "
                f"| {r['seconds_per_step']:.2f} | {r['peak_rss_mb']:.0f} | {useful / peak:.1%} | {vs[0]} | {vs[1]} |"
            )
    return lines


def budget_table(args, size: ModelSize) -> list[str]:
    """Longest single-pair length each path trains within TRL's peak RSS at --budget-length."""
    def spec(config: str, length: int) -> dict[str, Any]:
        shape = Shape("budget", int(length * 0.7), int(length * 0.15))  # long-prompt proportions
        return {"config": config, "model": asdict(size), "shape": asdict(shape), "batch": 1, "warmup": 0,
                "steps": 1}  # fmt: skip

    trl = spawn(spec("trl", args.budget_length))
    if "error" in trl:
        return [f"TRL at {args.budget_length} tokens failed: {trl['error']}"]
    budget = trl["peak_rss_mb"]
    lines = [f"Budget: TRL's peak RSS for one pair of ~{args.budget_length} tokens = {budget:.0f} MB.", "",
             "| config | longest length within budget | peak RSS there (MB) | vs TRL |", "|---|---|---|---|"]  # fmt: skip
    for config in ("prefalign-padded", "prefalign-packed"):
        best, best_rss = None, None
        for factor in args.budget_factors:
            r = spawn(spec(config, int(args.budget_length * factor)))
            print(f"  budget {config} x{factor}: {r}", file=sys.stderr)
            if "error" in r or r["peak_rss_mb"] > budget:
                break
            best, best_rss = factor, r["peak_rss_mb"]
        if best is None:
            lines.append(f"| {config} | < {args.budget_length} | | |")
        else:
            lines.append(f"| {config} | {int(args.budget_length * best)} | {best_rss:.0f} | >= {best:g}x |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model and short sequences: a < 1 minute smoke test")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 3; 1 with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--shapes", default="long,short", help="comma-separated: long, short")
    parser.add_argument("--budget-length", type=int, default=None, help="TRL length that sets the memory budget")
    parser.add_argument("--budget-factors", type=float, nargs="+", default=[1, 1.5, 2, 3, 4])
    parser.add_argument("--no-budget", action="store_true", help="skip the memory-budget length search")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    global IN_PROCESS
    IN_PROCESS = args.quick
    size = QUICK_MODEL if args.quick else ModelSize()
    args.steps = args.steps or (1 if args.quick else 3)
    args.budget_length = args.budget_length or (256 if args.quick else 1024)
    shapes = [s for s in (QUICK_SHAPES if args.quick else FULL_SHAPES) if s.name in args.shapes.split(",")]
    peak = matmul_peak_flops()
    print(f"# DPO step benchmark ({'quick' if args.quick else 'full'})\n")
    print(f"model: {asdict(size)}, fp32, CPU threads {__import__('torch').get_num_threads()}, batch {args.batch} "
          f"pairs, {args.warmup} warm-up + {args.steps} timed steps; matmul peak {peak / 1e9:.1f} GFLOP/s\n")  # fmt: skip
    print("\n".join(throughput_table(args, size, shapes, peak)))
    if args.quick:
        print("\n(--quick: all configurations share one process, so peak RSS is cumulative, not per configuration)")
    if not args.no_budget and not args.quick:
        print("\n" + "\n".join(budget_table(args, size)))


if __name__ == "__main__":
    main()
