"""`prefalign demo`: the whole alignment pipeline on the built-in addition task, with evaluation and a report.

train-tokenizer -> init-model -> SFT on answers of mixed quality -> DPO on (right, wrong) pairs with the SFT model
as reference -> KTO on the same pairs unpaired (right desirable, wrong undesirable), the SFT model as reference ->
(right, wrong) pairs of the SFT model's own judged answers -> reward model -> PPO with it, and GRPO
and online DPO with the task's judge as reward, all from the SFT model -> a fresh smaller student distilled from
the DPO model -> held-out evaluation of every stage -> report.json, report.md and PNG plots in --output_dir.

Every stage is a real trainer called in-process with its typed config (`demo/stages.py`). A rerun skips every stage
whose final model exists, and every evaluation whose result file (`<stage>/demo_eval.json`) exists.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer

from prefalign.config import DemoConfig, DPOConfig
from prefalign.config.tools import DEMO_RECIPES, DEMO_STAGES
from prefalign.data.load import load_rows, normalize_rows
from prefalign.demo import measure, task
from prefalign.demo import toy as st
from prefalign.demo.cache import timed_step
from prefalign.demo.real import run_real_demo
from prefalign.demo.report import QUICK_NOTE, check_line, gains, plot_stage_accuracy, write_report
from prefalign.errors import PrefalignError
from prefalign.rollout.answers import greedy_completions
from prefalign.stages.dpo import pair_metrics
from prefalign.train.plots import plot_run

REQUIRED_GAIN = {"dpo": 0.30, "kto": 0.25, "grpo": 0.20, "ppo": 0.20, "online-dpo": 0.30}
TEACHER_GAP = {"distill": ("dpo", 0.10)}  # a distilled student must come within this of its teacher's accuracy
NUM_SAMPLES = 6
PAIR_EVAL = DPOConfig(beta=0.1, max_length=64, per_device_eval_batch_size=64)  # how reward accuracy is measured


class Demo:
    """Paths and stage runners of one demo directory."""

    def __init__(self, cfg: DemoConfig) -> None:
        unknown = set(cfg.stages) - set(DEMO_STAGES)
        if unknown:
            raise PrefalignError(f"unknown stage {sorted(unknown)[0]!r}; choose from {', '.join(DEMO_STAGES)}", "--stages")
        if "distill" in cfg.stages and "dpo" not in cfg.stages:
            raise PrefalignError("distill needs dpo: the DPO model is the student's teacher", "--stages")
        self.cfg = cfg
        self.sizes = st.QUICK if cfg.quick else st.FULL
        self.out = Path(cfg.output_dir)
        self.data = self.out / "data"
        self.times: dict[str, float] = {}
        self.heldout = task.make_prompts(self.sizes.eval_prompts, cfg.seed + 99, "heldout")
        self._pairs: list | None = None  # held-out pairs, normalised on first use

    def path(self, name: str) -> Path:
        return self.out / name

    # ------------------------------------------------------------------ data
    def write_data(self) -> None:
        """The task's files (cheap and deterministic, so always rewritten)."""
        s, seed = self.sizes, self.cfg.seed
        task.write_pretrain_corpus(self.data / "corpus.jsonl", s.corpus, seed)
        task.write_sft(self.data / "sft.jsonl", s.sft_rows, seed)
        task.write_dpo_pairs(self.data / "pairs.jsonl", s.dpo_pairs, seed + 7)
        task.write_prompts(self.data / "prompts.jsonl", task.make_prompts(s.rl_prompts, seed + 11, "train"))
        task.write_jsonl(self.data / "heldout_pairs.jsonl", task.pair_rows(self.heldout, random.Random(seed + 13)))

    # ------------------------------------------------------------------ stages
    def _timed(self, name: str, run: Any, target: Path | None = None) -> None:
        timed_step(self.times, name, run, target or self.path(name))

    def train(self) -> None:
        s, seed, quiet, d = self.sizes, self.cfg.seed, self.cfg.disable_tqdm, self.data
        p = self.path
        self._timed("tokenizer", lambda: st.train_tokenizer(d / "corpus.jsonl", p("tokenizer"), s))
        self._timed("init", lambda: st.init_model(p("tokenizer"), p("init"), seed))
        self._timed("sft", lambda: st.sft(p("init"), d / "sft.jsonl", p("sft"), s, seed, quiet))
        stages = self.cfg.stages
        if "dpo" in stages:
            self._timed("dpo", lambda: st.dpo(p("sft"), d / "pairs.jsonl", d / "heldout_pairs.jsonl", p("dpo"), s,
                                              seed, quiet))
        if "kto" in stages:
            self._timed("kto", lambda: st.kto(p("sft"), d / "pairs.jsonl", d / "heldout_pairs.jsonl", p("kto"), s,
                                              seed, quiet))
        if "grpo" in stages:
            self._timed("grpo", lambda: st.grpo(p("sft"), d / "prompts.jsonl", p("grpo"), s, seed, quiet))
        if "ppo" in stages:
            self._timed("rm_data", lambda: st.write_rm_pairs(p("sft"), d / "rm_pairs.jsonl", s, seed),
                        d / "rm_pairs.jsonl")
            self._timed("rm", lambda: st.reward_model(p("sft"), d / "rm_pairs.jsonl", d / "heldout_pairs.jsonl",
                                                      p("rm"), s, seed, quiet))
            self._timed("ppo", lambda: st.ppo(p("sft"), p("rm"), d / "prompts.jsonl", p("ppo"), s, seed, quiet))
        if "online-dpo" in stages:
            self._timed("online-dpo", lambda: st.online_dpo(p("sft"), d / "prompts.jsonl", p("online-dpo"), s, seed,
                                                            quiet))
        if "distill" in stages:
            self._timed("distill_init", lambda: st.init_model(p("tokenizer"), p("distill_init"), seed + 31, 48))
            self._timed("distill", lambda: st.distill(p("dpo"), p("distill_init"), d / "sft.jsonl", p("distill"), s,
                                                      seed, quiet))

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, name: str, reference: Any, tokenizer: Any) -> dict[str, Any]:
        """Held-out accuracy (and, for aligned stages, KL and pair reward accuracy) of one stage, cached."""
        cached = self.path(name) / "demo_eval.json"
        if cached.is_file():
            return json.loads(cached.read_text())
        # the reference is the SFT model itself: no second copy of it
        model = reference if name == "sft" else AutoModelForCausalLM.from_pretrained(self.path(name)).eval()
        start = time.perf_counter()
        completions = greedy_completions(model, tokenizer, self.heldout,
                                                 desc=None if self.cfg.disable_tqdm else f"eval {name}")
        answers = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        result: dict[str, Any] = {"accuracy": measure.judged_accuracy(self.heldout, answers),
                                  "answers": answers[:NUM_SAMPLES]}
        if name != "sft":
            result["kl"] = measure.mean_token_kl(model, reference, tokenizer, self.heldout, completions)
            if self._pairs is None:  # read once for every aligned stage
                self._pairs = normalize_rows(load_rows(str(self.data / "heldout_pairs.jsonl")), PAIR_EVAL,
                                             "heldout_pairs")
            metrics = pair_metrics(model, reference, tokenizer, self._pairs, PAIR_EVAL)
            result["reward_accuracy"] = metrics["eval_rewards/accuracies"]
            result["reward_margin"] = metrics["eval_rewards/margins"]
        result["eval_time_s"] = time.perf_counter() - start
        cached.write_text(json.dumps(result, indent=2) + "\n")
        return result


def _plots(demo: Demo, stages: dict[str, Any]) -> list[str]:
    written = [plot_stage_accuracy({k: v["accuracy"] for k, v in stages.items()}, demo.out / "accuracy.png")]
    for name in ("sft", "dpo", "kto", "rm", "grpo", "ppo", "online-dpo", "distill"):
        if (demo.path(name) / "metrics.jsonl").is_file():
            written += plot_run(demo.path(name))
    return [p.relative_to(demo.out).as_posix() for p in written]


def build_report(demo: Demo, results: dict[str, dict[str, Any]], this_run: float) -> dict[str, Any]:
    stages = {}
    for name, r in results.items():
        stages[name] = {k: r[k] for k in ("accuracy", "kl", "reward_accuracy", "reward_margin") if k in r}
        # PPO's cost includes what only it needs: the reward model's on-policy data and its training
        extra = {"ppo": demo.times.get("rm_data", 0.0) + demo.times.get("rm", 0.0),
                 "distill": demo.times.get("distill_init", 0.0)}.get(name, 0.0)
        stages[name]["wall_time_s"] = demo.times.get(name, 0.0) + extra
        stages[name]["eval_time_s"] = r.get("eval_time_s")
    samples = [{"prompt": p, "reference": task.reference_answer(p), **{n: r["answers"][i] for n, r in results.items()}}
               for i, p in enumerate(demo.heldout[:NUM_SAMPLES])]
    return {
        "stages": stages, "baseline": "sft",
        "required_gain": {k: v for k, v in REQUIRED_GAIN.items() if k in stages},
        "teacher_gap": {k: {"teacher": t, "max_gap": gap} for k, (t, gap) in TEACHER_GAP.items() if k in stages},
        "samples": samples, "plots": _plots(demo, stages),
        # the whole demo's cost: every stage's training and evaluation, also when this run skipped some of them
        "total_wall_time_s": sum(demo.times.values()) + sum(r.get("eval_time_s", 0.0) for r in results.values()),
        "this_run_wall_time_s": this_run,
        "setup_wall_time_s": {k: demo.times[k] for k in ("tokenizer", "init", "rm_data", "rm", "distill_init")
                              if k in demo.times},
        "settings": {"seed": demo.cfg.seed, "quick": demo.cfg.quick, "heldout_prompts": len(demo.heldout),
                     "sizes": asdict(demo.sizes),
                     "kl": "mean exact per-token KL(policy || SFT) over the policy's greedy held-out completions",
                     "reward_accuracy": "eval_rewards/accuracies (beta 0.1) of the stage vs SFT on held-out pairs"},
    }


def summary(report: dict[str, Any], md_path: Path) -> str:
    """The closing lines: accuracy table, checks and where the report is."""
    lines = ["", f"{'stage':<10} {'accuracy':>8} {'gain':>7} {'KL':>7} {'reward acc':>10} {'time (s)':>8}"]
    base = report["stages"]["sft"]["accuracy"]
    for name, s in report["stages"].items():
        kl, ra = s.get("kl"), s.get("reward_accuracy")
        lines.append(f"{name:<10} {s['accuracy']:>8.3f} {s['accuracy'] - base:>+7.3f} "
                     f"{'-' if kl is None else f'{kl:.3f}':>7} {'-' if ra is None else f'{ra:.3f}':>10} "
                     f"{s['wall_time_s']:>8.1f}")
    checks = gains(report)
    if checks and (report.get("settings") or {}).get("quick"):
        lines.append(f"note: {QUICK_NOTE}")
    for name, c in checks.items():
        lines.append(check_line(report, name, c))
    lines.append(f"total {report['total_wall_time_s']:.0f} s of training and evaluation (this run "
                 f"{report['this_run_wall_time_s']:.0f} s); report: {md_path}")
    return "\n".join(lines)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Train (skipping finished stages), evaluate every stage on held-out prompts, write the report; returns it."""
    if cfg.recipe not in DEMO_RECIPES:
        raise PrefalignError(f"unknown recipe {cfg.recipe!r}; choose from {', '.join(DEMO_RECIPES)}", "--recipe")
    if cfg.recipe == "smollm2":
        return run_real_demo(cfg)
    if cfg.model_name_or_path:
        raise PrefalignError("the toy recipe builds its own model; only --recipe smollm2 takes a model",
                             "--model_name_or_path")
    start = time.perf_counter()
    demo = Demo(cfg)
    demo.write_data()
    demo.train()
    tokenizer = AutoTokenizer.from_pretrained(demo.path("sft"))
    reference = AutoModelForCausalLM.from_pretrained(demo.path("sft")).eval()
    results = {name: demo.evaluate(name, reference, tokenizer)
               for name in ("sft", *[s for s in DEMO_STAGES if s in cfg.stages])}
    report = build_report(demo, results, time.perf_counter() - start)
    _, md_path = write_report(demo.out, report)
    print(summary(report, md_path))
    return report


