"""Every stage but DPO (tests/e2e/test_deepspeed.py) under real DeepSpeed ZeRO-2 and ZeRO-3, 2 processes on CPU
(gloo), all in one torchrun launch (tests/e2e/deepspeed_runs.py): each logs the same per-step metrics as 1 process
without DeepSpeed on the same global batch (4 per device x 2 processes = 4 x accumulation 2), and saves a normal
Hugging Face directory with the 1-process weights.

The online stages (grpo, rloo, ppo, online-dpo, distill's student) sample with the policy: under ZeRO-3 its
weights are partitioned, so sampling runs with them gathered once (train.zero.generation_weights). Their policy here
is EOS-prone (`eos_prone_model`): completions stop at varied lengths, so the processes' decodes take different
numbers of steps. Measured: with the sampling left on the partitioned weights (per-layer all-gathers), the ZeRO-3
GRPO run aborts in gloo ("Received data size doesn't match expected size ... collective mismatch")."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from helpers import conv, run_cli, write_jsonl
from prefalign.train.metrics import read_metrics

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]
RL = ["--max_completion_length", "8", "--reward_funcs", "length:5"]
# command -> (flags, metrics compared step by step)
STAGES = {
    "pretrain": (["--max_length", "16"], ("loss", "grad_norm")),
    "sft": ([], ("loss", "mean_token_accuracy", "grad_norm")),
    "rm": ([], ("loss", "accuracy", "margin", "grad_norm")),
    "kto": ([], ("loss", "kl", "rewards/chosen", "logps/rejected", "grad_norm")),
    "grpo": ([*RL, "--num_generations", "4", "--beta", "0.1"],
             ("loss", "reward", "kl", "grad_norm", "completions/mean_length", "completions/clipped_ratio")),
    "rloo": ([*RL, "--num_generations", "4"], ("loss", "reward", "grad_norm", "completions/mean_length")),
    # PPO with a reward model (the ZeRO-3 rm run's output) and a value model copied from it, partitioned with the
    # policy; the reward model stays whole. One pass per rollout: every step samples its own, so a resume at step 2
    # is exact (a resume inside a rollout's passes resamples it, README)
    "ppo": ([*RL, "--num_ppo_epochs", "1"], ("loss/policy_avg", "loss/value_avg", "objective/scores", "policy/approxkl_avg", "grad_norm")),
    "online-dpo": (RL, ("loss", "objective/scores", "rewards/margins", "objective/kl", "grad_norm")),
    # the student samples every completion (--lmbda 1); the teacher is the tiny base model, kept whole
    "distill": (["--max_new_tokens", "8", "--lmbda", "1"], ("loss", "grad_norm", "completions/mean_length")),
}
# (command, ZeRO stage): every stage under ZeRO-3, the supervised ones and GRPO under ZeRO-2 too
RUNS = [(c, 3) for c in STAGES] + [(c, 2) for c in ("pretrain", "sft", "rm", "kto", "grpo")]
RESUMED = ("ppo",)  # under ZeRO-3 also resumed from its step-1 checkpoint (policy, value model, AdamW, rollout seed)
ONLINE = ("grpo", "rloo", "ppo", "online-dpo", "distill")  # the policy samples: the EOS-prone model


def _rows(command: str) -> list[dict]:
    if command == "pretrain":
        return [{"text": f"{a} plus {b} makes {a + b}"} for a in range(6) for b in range(2)]
    if command in ("sft", "distill"):
        return [{"messages": conv(("user", f"{a} + {b}"), ("assistant", f"{a + b}"))} for a in range(6) for b in (1, 2)]
    if command == "rm":
        return [{"prompt": conv(("user", f"what is {i}")), "chosen": conv(("assistant", f"{i} yes thanks")),
                 "rejected": conv(("assistant", "no"))} for i in range(12)]
    if command == "kto":
        return [{"prompt": conv(("user", f"what is {i % 7} + {i % 5}")),
                 "completion": conv(("assistant", f"{i % 7 + i % 5}" if i % 3 else f"{i} no")), "label": bool(i % 3)}
                for i in range(12)]
    return [{"prompt": conv(("user", f"what is {a} + {b}")), "answer": str(a + b)} for a in range(1, 5) for b in (1, 2)]


def eos_prone_model(src: Path, dst: Path) -> Path:
    """A copy of the tiny model whose LM head (untied) gives EOS the mean direction of its final hidden states on
    the prompts, at twice unit length: EOS is then a likely token, so completions stop at varied lengths."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src)
    text = "".join(tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
                   for row in _rows("grpo"))
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        mean = model.model(input_ids=ids).last_hidden_state[0].mean(0)  # (H,)
        head = model.get_input_embeddings().weight.detach().clone()  # (V, H)
        head[tok.eos_token_id] = 2.0 * mean / mean.norm()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(head)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def _argv(command: str, tmp: Path, models: dict[str, Path], out: Path) -> list[str]:
    flags, _ = STAGES[command]
    model = models["online" if command in ONLINE else "base"]
    extra = {"ppo": ["--reward_model_name_or_path", str(tmp / "z3_rm")],
             "distill": ["--teacher_model_name_or_path", str(models["base"])],
             # held-out prompts: evaluation samples with the gathered policy too
             "grpo": ["--eval_dataset_name", str(tmp / "grpo.jsonl"), "--per_device_eval_batch_size", "4"]
             }.get(command, [])
    return [command, "--model_name_or_path", str(model), "--dataset_name", str(tmp / f"{command}.jsonl"),
            "--learning_rate", "1e-2", "--max_steps", "2", "--logging_steps", "1", "--disable_tqdm", "--report_to",
            "none", "--per_device_train_batch_size", "4", "--save_steps", "1" if command in RESUMED else "0", *flags, *extra, "--output_dir", str(out)]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict:
    """Every (command, stage) 2-process run in one launch, then the 1-process runs without DeepSpeed (in-process)."""
    tmp = tmp_path_factory.mktemp("deepspeed_stages")
    for command in STAGES:
        write_jsonl(tmp / f"{command}.jsonl", _rows(command))
    models = {"base": tiny_model_dir, "online": eos_prone_model(tiny_model_dir, tmp / "eos_prone")}
    # rm first: PPO's reward model is the ZeRO-3 rm run's output
    order = sorted(RUNS, key=lambda run: run[0] != "rm")
    plan = [{"argv": [*_argv(c, tmp, models, tmp / f"z{z}_{c}"), "--deepspeed", f"zero{z}"]} for c, z in order]
    plan += [{"argv": [*_argv(c, tmp, models, tmp / f"z3_{c}_resumed"), "--deepspeed", "zero3",
                       "--resume_from_checkpoint", "latest"], "seed": str(tmp / f"z3_{c}" / "checkpoint-1")}
             for c in RESUMED]
    (tmp / "plan.json").write_text(json.dumps(plan))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
           "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run([torchrun, "--nproc_per_node", "2", str(ROOT / "tests/e2e/deepspeed_runs.py"),
                           str(tmp / "plan.json")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    launch = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-4000:]
    print(f"one launch of {len(plan)} runs: {launch:.1f} s")  # seen with pytest -s, as each run's time
    print("".join(line + "\n" for line in done.stdout.splitlines() if line.startswith("deepspeed_runs:")))
    for command in STAGES:
        assert run_cli(command, models["online" if command in ONLINE else "base"], tmp / f"{command}.jsonl",
                       tmp / f"one_{command}", *_argv(command, tmp, models, tmp / f"one_{command}")[5:],
                       "--gradient_accumulation_steps", "2") == 0
    return {"tmp": tmp, "stdout": done.stdout, "launch_seconds": launch}


@pytest.mark.parametrize(("command", "zero"), RUNS)
def test_stage_matches_one_process(runs, command, zero):
    tmp, keys = runs["tmp"], STAGES[command][1]
    assert not (tmp / f"z{zero}_{command}" / "error.txt").exists()
    one, two = read_metrics(tmp / f"one_{command}" / "metrics.jsonl"), read_metrics(tmp / f"z{zero}_{command}" /
                                                                                    "metrics.jsonl")
    assert [r["step"] for r in two if "loss" in r] == [1, 2]
    assert len(one) == len(two)
    for ra, rb in zip(one, two):
        for key in (*keys, "eval_reward"):
            if key not in ra:
                assert key not in rb, (command, zero, ra["step"], key)
                continue
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (command, zero, ra["step"], key)
    assert f"deepspeed   ZeRO-{zero}\n" in runs["stdout"]


@pytest.mark.parametrize(("command", "zero"), RUNS)
def test_saved_model_loads_whole(runs, command, zero):
    """ZeRO-3's partitioned weights are gathered: the output loads with its Auto class and equals 1 process's."""
    auto = AutoModelForSequenceClassification if command == "rm" else AutoModelForCausalLM
    tmp = runs["tmp"]
    ours = dict(auto.from_pretrained(tmp / f"z{zero}_{command}", dtype=torch.float32).named_parameters())
    theirs = dict(auto.from_pretrained(tmp / f"one_{command}", dtype=torch.float32).named_parameters())
    assert ours.keys() == theirs.keys()
    # atol: a tenth of one AdamW step at lr 1e-2. An entry whose gradient is near AdamW's eps (1e-8) moves by about
    # lr·g/(|g| + eps), so the 2 processes' summation-order differences there (~1e-9) show: up to 2e-4 measured (an
    # MLP weight of rm under ZeRO-3; the logged metrics agree within 1e-5 all the same)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("command", RESUMED)
def test_resume_continues_the_curve(runs, command):
    full = read_metrics(runs["tmp"] / f"z3_{command}" / "metrics.jsonl")
    resumed = read_metrics(runs["tmp"] / f"z3_{command}_resumed" / "metrics.jsonl")
    assert [r["step"] for r in resumed if "loss" in r] == [2]
    for key in STAGES[command][1]:
        assert resumed[0][key] == pytest.approx(full[1][key], rel=1e-6, abs=1e-7), (command, key)


def test_online_completions_stop_at_varied_lengths(runs):
    """The EOS-prone policy: some completions end before --max_completion_length and some do not."""
    for command in ONLINE:
        rows = read_metrics(runs["tmp"] / f"z3_{command}" / "metrics.jsonl")
        if command == "distill":  # logs mean lengths only
            assert any(0 < r["completions/mean_length"] < 8 for r in rows if "loss" in r)
            continue
        assert any(0 < r["completions/clipped_ratio"] < 1 for r in rows if "loss" in r), command
    assert "eval_reward" in read_metrics(runs["tmp"] / "z3_grpo" / "metrics.jsonl")[-1]
