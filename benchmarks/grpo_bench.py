"""GRPO training steps, `prefalign grpo` against TRL 1.16's GRPOTrainer, on a long-prompt and a short-prompt shape.

One step = sample a rollout (2 prompts x 8 generations of 32 tokens = 16 completions), score it, one optimizer
step on it; beta 0 (no reference), fp32, one process, the same randomly initialised Qwen2 (hidden 256, 4 layers,
vocab 32k, untied head) and the same prompts for both systems. Prompts are multi-turn conversations of word tokens
rendered with the same ChatML template; both tokenize them with the same word-level tokenizer.

- long:  ~300 prompt tokens (a system message and 6-10 turns), 8 x 32 completion tokens;
- short: ~40 prompt tokens (one user turn).

Each configuration runs in its own subprocess through its public entry point (`prefalign.cli.main(["grpo", ...])`,
`GRPOTrainer.train()`), so its peak RSS (ru_maxrss) is its own and the timing covers what a user runs: sampling,
rewards, advantages, forward, backward, AdamW. The first `--warmup` steps are not timed; a run reports its median
step, and with `--repeats N` the fastest of N runs of each configuration is kept. The reward is the same
cheap function for both (completion length in characters), so the rollouts never stop early (a random model
almost never samples EOS): every completion has 32 tokens.

Configurations: `prefalign` (its defaults: each group's prompt once in the training forwards, the shared-prompt
packed layout), `prefalign-padded` (`--share_prompt false`: one padded row per completion, as TRL), `trl` (TRL's
defaults, which switch gradient checkpointing on) and `trl-no-gc` (TRL without gradient checkpointing: faster,
more memory).

    python benchmarks/grpo_bench.py --quick     # smoke test, tiny model, ~1 minute
    python benchmarks/grpo_bench.py             # the RESULTS.md table (~10 minutes on 2 cores)
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
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONFIGS = ("prefalign", "prefalign-padded", "trl", "trl-no-gc")
GENERATIONS = 8
COMPLETION_TOKENS = 32
COMPLETIONS_PER_STEP = 16
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class Shape:
    name: str
    prompt: int  # mean prompt tokens
    turns: int  # user/assistant turns after the system message (0: one user turn, no system message)


@dataclass
class ModelSize:
    vocab: int = 32000
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 768


FULL_SHAPES = [Shape("long", 300, 8), Shape("short", 40, 0)]
QUICK_SHAPES = [Shape("long", 120, 4), Shape("short", 20, 0)]
QUICK_MODEL = ModelSize(vocab=2000, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=176)


def reward(completions: list, **_: Any) -> list[float]:
    """Length of the completion in characters (both systems call it; prefalign as `grpo_bench.py:reward`)."""
    return [float(len(c[0]["content"] if isinstance(c, list) else c)) for c in completions]


# ---------------------------------------------------------------- data, tokenizer, model (identical in every child)


def make_prompts(shape: Shape, n: int, vocab: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """n conversations of about `shape.prompt` tokens (+-25%), words "w3".."w{vocab-1}"."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        total = rng.randint(int(shape.prompt * 0.75), int(shape.prompt * 1.25))
        roles = ["user"] if shape.turns == 0 else ["system"] + [("user", "assistant")[t % 2] for t in range(shape.turns)]
        if roles[-1] != "user":
            roles.append("user")
        budget = max(len(roles), total - 3 * len(roles) - 2)  # each turn costs 3 template tokens, the generation prompt 2
        cuts = sorted(rng.sample(range(1, budget), len(roles) - 1)) if len(roles) > 1 else []
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, budget])]
        out.append([{"role": r, "content": " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(k))}
                    for r, k in zip(roles, sizes)])
    return out


def word_tokenizer(vocab: int):
    """Word-level tokenizer: "<pad>" 0, "<eos>" 1 (= <|im_end|>), "<unk>" 2, "w3".."w{vocab-5}", then the template's
    special tokens and role words, so every id is known and both systems tokenize identically."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<|im_end|>": 1, "<unk>": 2} | {f"w{i}": i for i in range(3, vocab - 4)}
    words |= {"<|im_start|>": vocab - 4, "system": vocab - 3, "user": vocab - 2, "assistant": vocab - 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", unk_token="<unk>")
    out.chat_template = CHATML
    return out


def build_model(size: ModelSize):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


# ---------------------------------------------------------------- the configurations (run in a child)


def run_prefalign(model_dir: Path, prompts: list, steps: int, work: Path, share_prompt: bool) -> list[float]:
    import prefalign.train.loop as loop
    from prefalign.cli import main

    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    times: list[float] = []
    original = loop._Run.step

    def timed(self, groups):  # the whole optimizer step: sampling, scoring, forward, backward, AdamW
        start = time.perf_counter()
        out = original(self, groups)
        times.append(time.perf_counter() - start)
        return out

    loop._Run.step = timed
    code = main(["grpo", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir",
                 str(work / "out"), "--reward_funcs", f"{Path(__file__).resolve()}:reward",
                 "--num_generations", str(GENERATIONS), "--per_device_train_batch_size", str(COMPLETIONS_PER_STEP),
                 "--max_completion_length", str(COMPLETION_TOKENS), "--max_prompt_length", "2048", "--beta", "0",
                 "--learning_rate", "1e-6", "--max_steps", str(steps), "--save_steps", "0", "--logging_steps", "1",
                 "--disable_tqdm", "--seed", "0", "--share_prompt", str(share_prompt).lower()])  # fmt: skip
    if code != 0:
        raise RuntimeError(f"prefalign grpo exited with {code}")
    return times


def run_trl(model_dir: Path, prompts: list, steps: int, work: Path, gradient_checkpointing: bool) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    times: list[float] = []

    class StepTimer(TrainerCallback):  # on_step_begin .. on_step_end spans generation, scoring and the update
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    args = GRPOConfig(
        output_dir=str(work / "out"), per_device_train_batch_size=COMPLETIONS_PER_STEP, num_generations=GENERATIONS,
        max_completion_length=COMPLETION_TOKENS, beta=0.0, learning_rate=1e-6, max_steps=steps, use_cpu=True,
        bf16=False, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
        dataloader_num_workers=0, gradient_checkpointing=gradient_checkpointing,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tokenizer,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), callbacks=[StepTimer()])
    trainer.train()
    return times


def check_tokenization(model_dir: Path, prompt: list) -> None:
    """Both systems must see the same prompt ids: prefalign renders then encodes, TRL tokenizes in the template."""
    from transformers import AutoTokenizer

    from prefalign.data.templates import render

    tok = AutoTokenizer.from_pretrained(model_dir)
    ours = tok(render(tok, prompt, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    trl = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    if ours != list(trl) or tok.unk_token_id in ours:
        raise RuntimeError("the two systems would tokenize the benchmark prompts differently")


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration; report step times and this process's peak RSS."""
    import torch

    size, shape = ModelSize(**spec["model"]), Shape(**spec["shape"])
    steps = spec["warmup"] + spec["steps"]
    prompts = make_prompts(shape, 2 * steps * COMPLETIONS_PER_STEP // GENERATIONS, size.vocab)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_model(size)
        model.save_pretrained(work / "model")
        word_tokenizer(size.vocab).save_pretrained(work / "model")
        del model
        check_tokenization(work / "model", prompts[0])
        if spec["config"].startswith("prefalign"):
            times = run_prefalign(work / "model", prompts, steps, work, share_prompt=spec["config"] == "prefalign")
        else:
            times = run_trl(work / "model", prompts, steps, work, gradient_checkpointing=spec["config"] == "trl")
    timed = times[spec["warmup"] :]
    # The median step: on a shared machine a step that another job slowed down moves the mean, not the median.
    result = {"seconds_per_step": sorted(timed)[len(timed) // 2], "steps_timed": len(timed),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def spawn(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the parent: the table


def table(args, size: ModelSize, shapes: list[Shape]) -> list[str]:
    lines = ["| shape | config | steps/s | completions/s | s/step | peak RSS (MB) | vs TRL steps/s | vs TRL RSS "
             "| vs TRL-no-gc steps/s | vs TRL-no-gc RSS |", "|---|---|---|---|---|---|---|---|---|---|"]
    for shape in shapes:
        results = {}
        for config in args.configs:
            spec = {"config": config, "model": asdict(size), "shape": asdict(shape), "warmup": args.warmup,
                    "steps": args.steps}
            runs = [spawn(spec) for _ in range(args.repeats)]
            ok = [r for r in runs if "error" not in r]
            # the fastest of the repeats (the least disturbed by other jobs); memory does not depend on load
            results[config] = min(ok, key=lambda r: r["seconds_per_step"]) if ok else runs[0]
            print(f"  {shape.name} {config}: {results[config]}", file=sys.stderr)
        for config, r in results.items():
            if "error" in r:
                lines.append(f"| {shape.name} | {config} | error: {r['error']} | | | | | | | |")
                continue
            cells = [f"{1 / r['seconds_per_step']:.3f}", f"{COMPLETIONS_PER_STEP / r['seconds_per_step']:.1f}",
                     f"{r['seconds_per_step']:.2f}", f"{r['peak_rss_mb']:.0f}"]
            for base in ("trl", "trl-no-gc"):
                b = results.get(base)
                if b is None or "error" in b:
                    cells += ["", ""]
                else:
                    cells += [f"{b['seconds_per_step'] / r['seconds_per_step']:.2f}x",
                              f"{r['peak_rss_mb'] / b['peak_rss_mb']:.2f}x"]
            lines.append(f"| {shape.name} | {config} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model and short prompts: a smoke test")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 4; 1 with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each configuration; the fastest is reported")
    parser.add_argument("--shapes", default="long,short", help="comma-separated: long, short")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated: {', '.join(CONFIGS)}")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 32000)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    size = QUICK_MODEL if args.quick else ModelSize()
    if args.vocab:
        size.vocab = args.vocab
    args.steps = args.steps or (1 if args.quick else 4)
    args.configs = args.configs.split(",")
    shapes = [s for s in (QUICK_SHAPES if args.quick else FULL_SHAPES) if s.name in args.shapes.split(",")]
    import torch

    print(f"# GRPO step benchmark ({'quick' if args.quick else 'full'})\n")
    print(f"model: {asdict(size)}, fp32, CPU threads {torch.get_num_threads()}, {COMPLETIONS_PER_STEP} completions "
          f"per step ({GENERATIONS} generations x {COMPLETION_TOKENS} tokens), beta 0; {args.warmup} warm-up + "
          f"{args.steps} timed steps (median), best of {args.repeats} runs; load average before: {os.getloadavg()[0]:.2f}\n")
    print("\n".join(table(args, size, shapes)))


if __name__ == "__main__":
    main()
