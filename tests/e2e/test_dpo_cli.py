"""`prefalign dpo` end to end on a tiny model: metrics, outputs, checkpoints, resume, invariants, errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import conv, run_cli, write_jsonl
from prefalign.train.metrics import read_metrics

TRL_KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "logits/chosen", "logits/rejected", "grad_norm", "learning_rate", "epoch",
            "pairs/s", "tokens/s", "step"}


def _pairs(n: int = 16) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i % 7 + 1, i % 5 + 2
        rows.append({
            "prompt": conv(("user", f"what is {a} + {b}")),
            "chosen": conv(("assistant", f"{a} + {b} = {a + b}")),
            "rejected": conv(("assistant", f"{a} + {b} = {a + b + 1} no")),
        })
    return rows


@pytest.fixture()
def pairs_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", _pairs())


def _run(model_dir, data, out, *extra) -> int:
    return run_cli("dpo", model_dir, data, out, "--per_device_train_batch_size", 4, "--learning_rate", 1e-3, *extra)


def test_dpo_run_writes_metrics_model_and_checkpoints(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    assert _run(tiny_model_dir, pairs_file, out, "--max_steps", 4, "--save_steps", 2, "--beta", 0.5) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert set(records[0]) >= TRL_KEYS
    first, last = records[0], records[-1]
    # Step 1 is computed before any update: policy == reference, so rewards and margins are exactly 0, loss = ln 2.
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert last["rewards/margins"] > 0 and last["loss"] < first["loss"]
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (out / "checkpoint-4").exists()  # the final step is the final model, not a checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_batch_times_accumulation_gives_the_same_update(tiny_model_dir, pairs_file, tmp_path):
    """B=4 x A=1, B=2 x A=2 and B=1 x A=4 see the same 4 pairs in step 1 and must give the same update.

    The pre-clip gradient norm is the sharp check: a wrong normalisation (sum instead of mean, or dividing by A
    twice) scales it by 2 or 4. Adam's first step is nearly scale-invariant, so the weights only confirm direction
    (atol 1e-5 = 1% of lr, because Adam's first step is ~lr·sign(g) and amplifies float noise where g ≈ 0)."""
    from safetensors.torch import load_file

    weights, logged = [], []
    for b, a in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"b{b}a{a}"
        assert _run(tiny_model_dir, pairs_file, out, "--max_steps", 1, "--per_device_train_batch_size", b,
                    "--gradient_accumulation_steps", a, "--max_grad_norm", 0) == 0
        weights.append(load_file(out / "model.safetensors"))
        logged.append(read_metrics(out / "metrics.jsonl")[0])
    for other, record in zip(weights[1:], logged[1:]):
        for key in ("grad_norm", "loss", "rewards/accuracies", "logps/chosen", "logits/rejected"):
            assert record[key] == pytest.approx(logged[0][key], rel=1e-5), key
        for name, value in weights[0].items():
            torch.testing.assert_close(other[name], value, atol=1e-5, rtol=1e-4)


def test_resume_reproduces_the_uninterrupted_curve(tiny_model_dir, pairs_file, tmp_path):
    full = tmp_path / "full"
    assert _run(tiny_model_dir, pairs_file, full, "--max_steps", 8, "--save_steps", 3, "--use_peft",
                "--lora_r", 4, "--lora_dropout", 0.1, "--disable_dropout", "false", "--num_train_epochs", 3) == 0
    # A run killed after checkpoint-3 leaves exactly that checkpoint and metrics up to (and past) step 3 on disk.
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copytree(full / "checkpoint-3", killed / "checkpoint-3")
    lines = (full / "metrics.jsonl").read_text().splitlines()[:5]  # steps 1..5: logged after the checkpoint
    (killed / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert _run(tiny_model_dir, pairs_file, killed, "--max_steps", 8, "--save_steps", 3, "--use_peft",
                "--lora_r", 4, "--lora_dropout", 0.1, "--disable_dropout", "false", "--num_train_epochs", 3,
                "--resume_from_checkpoint", "latest") == 0
    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm", "learning_rate", "epoch"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)


def test_same_seed_repeats_exactly(tiny_model_dir, pairs_file, tmp_path):
    runs = []
    for name in ("a", "b"):
        assert _run(tiny_model_dir, pairs_file, tmp_path / name, "--max_steps", 3, "--seed", 7) == 0
        runs.append([{k: v for k, v in r.items() if not k.endswith("/s")} for r in
                     read_metrics(tmp_path / name / "metrics.jsonl")])
    assert runs[0] == runs[1]


def test_failed_start_keeps_earlier_run(tiny_model_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(tiny_model_dir, pairs_file, out, "--max_steps", 1) == 0
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert _run(tiny_model_dir, pairs_file, out, "--max_steps", 1) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds an earlier run" in err[0]
    assert (out / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--loss_type", "sigmod"], "unknown"),
        (["--beta", "x"], "--beta: expected a number"),
        (["--model_name_or_path", "/no/such/model"], "/no/such/model"),
        (["--sync_ref_model", "--use_peft"], "--sync_ref_model: a LoRA policy's reference is its own base"),
        (["--sync_ref_model", "--precompute_ref_log_probs"], "--sync_ref_model: precomputed reference log-probs"),
        (["--sync_ref_model", "--loss_type", "simpo"], "--sync_ref_model: simpo use no reference model"),
        (["--dpop_lambda", "1", "--loss_type", "orpo"], "--dpop_lambda: DPOP penalises the chosen log-ratio"),
    ],
)
def test_bad_config_is_one_line_error_before_training(tiny_model_dir, pairs_file, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert _run(tiny_model_dir, pairs_file, out, "--max_steps", 1, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (out / "metrics.jsonl").exists()


def test_malformed_data_via_real_entry_point(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_pairs(1)[0]) + "\n{not json\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    proc = subprocess.run([sys.executable, "-m", "prefalign.cli", "dpo", "--model_name_or_path", str(tiny_model_dir),
                           "--dataset_name", str(bad), "--output_dir", str(tmp_path / "o"), "--max_steps", "1"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.jsonl:2" in lines[0] and "Traceback" not in proc.stderr


def _hand_logps(model_dir, pairs_file) -> list[tuple[float, int, float, int]]:
    """(sum of chosen token log-probs, chosen tokens, the same for rejected) of every pair, from one plain
    full-sequence forward per completion of the untrained model: the step-1 inputs, computed apart from the stage."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefalign.config import DataArgs
    from prefalign.data.load import load_pairs
    from prefalign.data.tokenize import Truncation, tokenize_pairs

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    pairs, _ = tokenize_pairs(load_pairs(DataArgs(dataset_name=str(pairs_file)))[0],
                              AutoTokenizer.from_pretrained(model_dir), Truncation(max_length=1024))
    out = []
    with torch.no_grad():
        for pair in pairs:
            row = []
            for completion in (pair.chosen_ids, pair.rejected_ids):
                ids = torch.tensor([pair.prompt_ids + completion])
                logps = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
                start = len(pair.prompt_ids)
                row += [sum(logps[t - 1, ids[0, t]].item() for t in range(start, ids.size(1))), len(completion)]
            out.append(tuple(row))
    return out


def test_reference_free_and_combined_losses_at_step_1(tiny_model_dir, pairs_file, tmp_path):
    """Step 1 (all 16 pairs in one batch, before any update) against the formulas written out here, beta 0.1:
    SimPO  -log σ(β(ā_c − ā_r) − γ), ā = mean token log-prob, γ = 0.5;
    ORPO   −ā_c − β log σ((ā_c − ā_r) − (log(1 − e^ā_c) − log(1 − e^ā_r)));
    DPO + SFT: ln 2 (policy = reference) + the chosen NLL −ā_c."""
    hand = _hand_logps(tiny_model_dir, pairs_file)
    beta, gamma = 0.1, 0.5

    def logsig(z: float) -> float:
        return -math.log1p(math.exp(-z))

    def mean(values) -> float:
        values = list(values)
        return sum(values) / len(values)

    avg = [(sc / nc, sr / nr) for sc, nc, sr, nr in hand]
    expected = {
        "simpo": mean(-logsig(beta * (c - r) - gamma) for c, r in avg),
        "orpo": mean(-c - beta * logsig((c - r) - (math.log(-math.expm1(c)) - math.log(-math.expm1(r))))
                     for c, r in avg),
        "sigmoid_sft": math.log(2) + mean(-c for c, _ in avg),
    }
    for losses in (["simpo"], ["orpo"], ["sigmoid", "sft"]):
        out = tmp_path / "_".join(losses)
        assert _run(tiny_model_dir, pairs_file, out, "--max_steps", 1, "--per_device_train_batch_size", 16,
                    "--loss_type", *losses) == 0
        (first,) = read_metrics(out / "metrics.jsonl")
        assert first["loss"] == pytest.approx(expected["_".join(losses)], rel=1e-5), losses
    assert first["logps/chosen"] == pytest.approx(mean(h[0] for h in hand), rel=1e-5)  # sums of token log-probs


def test_python_api(tiny_model_dir, pairs_file, tmp_path):
    from prefalign import DPOConfig, train_dpo

    result = train_dpo(DPOConfig(model_name_or_path=str(tiny_model_dir), dataset_name=str(pairs_file),
                                 output_dir=str(tmp_path / "api"), max_steps=2, per_device_train_batch_size=4,
                                 disable_tqdm=True))
    assert result.state.global_step == 2 and "loss" in result.last_metrics


class _ForwardLog:
    """Every forward of a whole causal LM in this process, as (model id, grad enabled), via torch's global
    forward pre-hook. Training forwards the policy with grad; a reference forward runs without."""

    def __enter__(self):
        from transformers import PreTrainedModel

        self.calls: list[tuple[int, bool]] = []

        def hook(module, _args):
            if isinstance(module, PreTrainedModel) and hasattr(module, "lm_head"):
                self.calls.append((id(module), torch.is_grad_enabled()))

        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def reference_forwards_during_training(self) -> int:
        """No-grad forwards after the first training (grad) forward."""
        first = next(i for i, (_, grad) in enumerate(self.calls) if grad)
        return sum(not grad for _, grad in self.calls[first:])


def test_precomputed_reference_matches_live_and_is_reused(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFALIGN_CACHE_DIR", str(tmp_path / "cache"))
    live, pre, again = tmp_path / "live", tmp_path / "pre", tmp_path / "again"
    with _ForwardLog() as live_log:
        assert _run(tiny_model_dir, pairs_file, live, "--max_steps", 3) == 0
    with _ForwardLog() as pre_log:
        assert _run(tiny_model_dir, pairs_file, pre, "--max_steps", 3, "--precompute_ref_log_probs") == 0
    # 16 pairs in batches of 4: the live run forwards the reference once per micro-batch, the precomputed one
    # forwards it only before training (16 pairs in batches of per_device_eval_batch_size 8) and never during it
    assert live_log.reference_forwards_during_training() == 3
    assert pre_log.reference_forwards_during_training() == 0
    assert sum(not grad for _, grad in pre_log.calls) == 2
    files = list((tmp_path / "cache" / "ref_logps").glob("*.safetensors"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    assert _run(tiny_model_dir, pairs_file, again, "--max_steps", 3, "--precompute_ref_log_probs") == 0
    assert files[0].stat().st_mtime_ns == stamp  # same key: read, not recomputed
    for a, b in zip(read_metrics(live / "metrics.jsonl"), read_metrics(pre / "metrics.jsonl")):
        for key in ("loss", "rewards/margins", "rewards/chosen"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7)


def test_lora_dpo_and_sft_adapter_as_policy_and_reference(tiny_model_dir, pairs_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    first = tmp_path / "lora"
    assert _run(tiny_model_dir, pairs_file, first, "--max_steps", 2, "--use_peft", "--lora_r", 4,
                "--merge_adapter") == 0
    assert (first / "adapter_config.json").is_file() and (first / "merged" / "config.json").is_file()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), first)
    # Continue from that adapter: trained copy + frozen reference copy in one base model. Before the first update
    # policy == reference, so the first step's margin is exactly zero even though the adapter is not.
    second = tmp_path / "continued"
    assert _run(tiny_model_dir, pairs_file, second, "--max_steps", 2, "--peft_adapter_path", first) == 0
    records = read_metrics(second / "metrics.jsonl")
    assert records[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.slow
def test_ctrl_c_saves_a_resumable_checkpoint(tiny_model_dir, pairs_file, tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    args = [sys.executable, "-m", "prefalign.cli", "dpo", "--model_name_or_path", str(tiny_model_dir),
            "--dataset_name", str(pairs_file), "--output_dir", str(out), "--max_steps", "400", "--logging_steps", "1",
            "--per_device_train_batch_size", "2", "--disable_tqdm", "--save_steps", "0"]
    # A suite started as a background job inherits SIGINT ignored, and so would the child: give it the default back.
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists()
                                          and len((out / "metrics.jsonl").read_text().splitlines()) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert ckpts and (ckpts[-1] / "trainer_state.json").is_file()
    step = json.loads((ckpts[-1] / "trainer_state.json").read_text())["global_step"]
    assert 2 <= step < 400
    resumed = subprocess.run([*args[:-2], "--save_steps", "0", "--max_steps", str(step + 2), "--resume_from_checkpoint",
                              "latest"], env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert read_metrics(out / "metrics.jsonl")[-1]["step"] == step + 2


def test_bf16_autocast_and_tensorboard(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "bf16"
    assert _run(tiny_model_dir, pairs_file, out, "--max_steps", 2, "--bf16", "--report_to", "tensorboard") == 0
    first, second = read_metrics(out / "metrics.jsonl")
    # under bf16 autocast policy and reference still run the same computation on the same weights at step 1
    assert first["rewards/margins"] == 0.0 and first["rewards/chosen"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert math.isfinite(second["loss"]) and second["rewards/margins"] != 0.0  # and it trains
    assert list(out.rglob("events.out.tfevents.*"))


def test_fast_path_is_default_and_equals_padded(tiny_model_dir, tmp_path, capsys):
    """Packed shared-prompt batches (the default), packed without sharing, and padded rows give the same curve;
    multi-turn prompts of mixed lengths make padding and prompt sharing matter."""
    rows = []
    for i in range(12):
        history = [("user", "hello " * (1 + i % 4)), ("assistant", "hi there"), ("user", f"what is {i} + {i % 3}")]
        rows.append({"prompt": conv(*history), "chosen": conv(("assistant", f"{i + i % 3}")),
                     "rejected": conv(("assistant", f"{i + i % 3 + 1} " + "no " * (i % 3)))})
    data = write_jsonl(tmp_path / "multi.jsonl", rows)
    curves, layouts = {}, {}
    for name, extra in {"shared": [], "packed": ["--share_prompt", "false"],
                        "padded": ["--padding_free", "false"]}.items():
        assert _run(tiny_model_dir, data, tmp_path / name, "--max_steps", 3, *extra) == 0
        curves[name] = read_metrics(tmp_path / name / "metrics.jsonl")
        layouts[name] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  layout ")]
    # the default really ran packed with a shared prompt (a silent fallback to padding would pass the curves)
    assert layouts == {"shared": ["  layout      packed (padding-free), shared prompt"],
                       "packed": ["  layout      packed (padding-free)"], "padded": ["  layout      padded (--padding_free false)"]}
    for name in ("shared", "packed"):
        for a, b in zip(curves["padded"], curves[name]):
            for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "grad_norm"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (name, a["step"], key)
    # The shared layout processes fewer tokens per pair: tokens/s counts unique tokens, the prompt once.
    assert _run(tiny_model_dir, data, tmp_path / "budget", "--max_steps", 2, "--max_tokens_per_batch", 160) == 0


def test_tr_dpo_moves_the_reference_and_resumes_with_it(tiny_model_dir, pairs_file, tmp_path):
    """TR-DPO with τ = 2, α = 0.6 (and DPOP on top): after optimizer step 2 the reference saved in checkpoint-2 is
    0.6 · the policy of checkpoint-2 + 0.4 · the initial policy (the reference it started from), parameter by
    parameter; a run resumed from checkpoint-2 continues with that reference and repeats the uninterrupted curve."""
    from safetensors.torch import load_file

    common = ["--max_steps", 4, "--save_steps", 2, "--per_device_train_batch_size", 2, "--sync_ref_model",
              "--ref_model_sync_steps", 2, "--ref_model_mixup_alpha", 0.6, "--dpop_lambda", 5]
    full = tmp_path / "full"
    assert _run(tiny_model_dir, pairs_file, full, *common) == 0
    initial = load_file(tiny_model_dir / "model.safetensors")
    policy = load_file(full / "checkpoint-2" / "model.safetensors")
    reference = load_file(full / "checkpoint-2" / "reference" / "model.safetensors")
    assert set(reference) == set(policy)
    for name, value in reference.items():
        torch.testing.assert_close(value, 0.6 * policy[name] + 0.4 * initial[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(policy[n], initial[n]) for n in policy)  # the case says something
    records = read_metrics(full / "metrics.jsonl")
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # no DPOP penalty before the first update
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    assert _run(tiny_model_dir, pairs_file, resumed, *common, "--resume_from_checkpoint", "latest") == 0
    for ra, rb in zip(records[2:], read_metrics(resumed / "metrics.jsonl")):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
