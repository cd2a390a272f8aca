"""`prefalign kto` end to end on a tiny model: metrics, outputs, invariants (B x A, resume, layouts, precomputed
reference), reference modes, one-line errors. (Parity with TRL's KTOTrainer is tests/stages/test_kto.py.)"""

from __future__ import annotations

import math
import shutil

import pytest

from helpers import conv, run_cli, write_jsonl
from prefalign.train.metrics import read_metrics

TRL_KEYS = {"loss", "kl", "entropy", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
            "logps/rejected", "logits/chosen", "logits/rejected", "grad_norm", "learning_rate", "epoch", "num_tokens"}
STEP_KEYS = ("loss", "kl", "grad_norm", "rewards/chosen", "logps/rejected", "logits/chosen", "entropy")


def _pairs(n: int = 8) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = i % 7 + 1, i % 5 + 2
        history = [("user", "hello " * (1 + i % 3)), ("assistant", "hi"), ("user", f"what is {a} + {b}")]
        rows.append({"prompt": conv(*history), "chosen": conv(("assistant", f"{a + b}")),
                     "rejected": conv(("assistant", f"{a + b + 1} no " * (1 + i % 2)))})
    return rows


def _feedback(n: int = 12) -> list[dict]:
    return [{"question": f"what is {i % 7} + {i % 5}", "answer": f" {i % 7 + i % 5}" if i % 3 else f" {i} no",
             "thumbs": "up" if i % 3 else "down"} for i in range(n)]


def _same(a: list[dict], b: list[dict], keys=STEP_KEYS, rel: float = 1e-5, abs_: float = 1e-7) -> None:
    """Two runs logged the same steps with the same values (a label metric only where the step had that label)."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert {k for k in keys if k in ra} == {k for k in keys if k in rb}, ra["step"]
        for key in keys:
            if key in ra:
                # KL is a mean of differences of ~-100 summed log-probs: float32 summation order alone moves it by
                # ~1e-6 (it is ~0 at step 1, where the relative tolerance gives no room).
                tol = max(abs_, 5e-6) if key == "kl" else abs_
                assert rb[key] == pytest.approx(ra[key], rel=rel, abs=tol), (ra["step"], key)


@pytest.fixture()
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", _pairs())


def _run(model_dir, data, out, *extra) -> int:
    return run_cli("kto", model_dir, data, out, "--per_device_train_batch_size", 4, "--learning_rate", 1e-3, *extra)


def test_kto_on_pairs_unpaired_on_the_fly(tiny_model_dir, pairs_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(tiny_model_dir, pairs_file, out, "--max_steps", 4, "--save_steps", 2, "--eval_split_ratio", 0.25) == 0
    printed = capsys.readouterr().out
    assert "train: 12 of 12 examples kept" in printed and "6 desirable, 6 undesirable" in printed
    assert "warning" not in printed  # balanced: no advice
    assert "kto: 4 steps, loss=" in printed
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    first = records[0]
    assert set().union(*records) >= TRL_KEYS  # a step without one label logs none of its metrics, as TRL
    # Before the first update policy == reference: rewards and z are 0 and every example's loss is 1 − σ(0) = 0.5.
    assert first["loss"] == pytest.approx(0.5, abs=1e-6)
    assert first["kl"] == pytest.approx(0.0, abs=1e-5) and first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert records[-1]["loss"] < first["loss"]
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]
    assert evals and {"eval_kl", "eval_rewards/margins", "eval_logps/chosen"} <= set(evals[-1])
    assert not any(k.startswith("_") or k.startswith("eval__") for r in records + evals for k in r)
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_thumbs_columns_and_the_balance_warning(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "fb.jsonl", _feedback())
    out = tmp_path / "run"
    assert _run(tiny_model_dir, data, out, "--max_steps", 1, "--prompt_column", "question", "--completion_column",
                "answer", "--label_column", "thumbs", "--loss_type", "apo_zero_unpaired") == 0
    printed = capsys.readouterr().out
    assert "8 desirable, 4 undesirable" in printed
    assert "warning: 8 desirable and 4 undesirable examples" in printed and "[0.5, 0.67]" in printed
    assert read_metrics(out / "metrics.jsonl")[0]["kl"] == 0.0  # APO-zero uses no KL pairs


def test_batch_times_accumulation_gives_the_same_update(tiny_model_dir, pairs_file, tmp_path):
    """B=4 x A=1, B=2 x A=2 and B=1 x A=4: the same 4 examples, the same KL pairs (rolled over the step) and z, the
    same normalisation. The pre-clip gradient norm is the sharp check (see test_dpo_cli)."""
    logged = []
    for b, a in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"b{b}a{a}"
        assert _run(tiny_model_dir, pairs_file, out, "--max_steps", 2, "--per_device_train_batch_size", b,
                    "--gradient_accumulation_steps", a, "--max_grad_norm", 0) == 0
        logged.append(read_metrics(out / "metrics.jsonl"))
    for other in logged[1:]:
        _same(logged[0], other)


@pytest.mark.parametrize("extra", [[], ["--loss_type", "bco", "--sync_ref_model", "--ref_model_sync_steps", 2]],
                         ids=["kto", "bco-sync"])
def test_resume_reproduces_the_uninterrupted_curve(tiny_model_dir, pairs_file, tmp_path, extra):
    """BCO's running reward mean and TR-DPO's moved reference live in the checkpoint: without them steps 4-6 differ."""
    common = ["--max_steps", 6, "--save_steps", 3, "--per_device_train_batch_size", 2, "--num_train_epochs", 3, *extra]
    full = tmp_path / "full"
    assert _run(tiny_model_dir, pairs_file, full, *common) == 0
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copytree(full / "checkpoint-3", killed / "checkpoint-3")
    lines = (full / "metrics.jsonl").read_text().splitlines()[:4]
    (killed / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert _run(tiny_model_dir, pairs_file, killed, *common, "--resume_from_checkpoint", "latest") == 0
    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 7))
    _same(a, b, STEP_KEYS + ("delta", "learning_rate", "epoch"))
    if extra:
        assert a[3]["delta"] != 0.0 and (full / "checkpoint-3" / "bco_running.json").is_file()
        assert (full / "checkpoint-3" / "reference" / "model.safetensors").is_file()


def test_padding_free_equals_padded(tiny_model_dir, pairs_file, tmp_path):
    curves = {}
    for name, extra in {"packed": [], "padded": ["--padding_free", "false"]}.items():
        assert _run(tiny_model_dir, pairs_file, tmp_path / name, "--max_steps", 3, *extra) == 0
        curves[name] = read_metrics(tmp_path / name / "metrics.jsonl")
    _same(curves["padded"], curves["packed"], abs_=1e-6)


def test_reference_modes(tiny_model_dir, tiny_llama_dir, pairs_file, tmp_path):
    """LoRA (reference = adapter disabled), a continued adapter (frozen twin) and another reference model."""
    lora = tmp_path / "lora"
    assert _run(tiny_model_dir, pairs_file, lora, "--max_steps", 2, "--use_peft", "--lora_r", 4) == 0
    assert (lora / "adapter_config.json").is_file()
    continued = tmp_path / "continued"
    assert _run(tiny_model_dir, pairs_file, continued, "--max_steps", 1, "--peft_adapter_path", lora) == 0
    for run in (lora, continued):  # policy == reference before the first update
        first = read_metrics(run / "metrics.jsonl")[0]
        assert first["loss"] == pytest.approx(0.5, abs=1e-6) and first["kl"] == pytest.approx(0.0, abs=1e-5)
    other = tmp_path / "other"
    assert _run(tiny_model_dir, pairs_file, other, "--max_steps", 1, "--ref_model_name_or_path", tiny_llama_dir,
                "--tokenizer_name_or_path", tiny_model_dir) == 0
    first = read_metrics(other / "metrics.jsonl")[0]
    assert first["kl"] > 0 and first["rewards/chosen"] != 0.0 and math.isfinite(first["loss"])


def test_precomputed_reference_matches_live_and_is_reused(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    """Over 2 epochs (shuffled, so the KL pairs of epoch 2 differ from epoch 1's) and with evaluation."""
    monkeypatch.setenv("PREFALIGN_CACHE_DIR", str(tmp_path / "cache"))
    common = ["--max_steps", 5, "--per_device_train_batch_size", 5, "--num_train_epochs", 3, "--eval_split_ratio",
              0.25, "--eval_steps", 5]
    assert _run(tiny_model_dir, pairs_file, tmp_path / "live", *common) == 0
    assert _run(tiny_model_dir, pairs_file, tmp_path / "pre", *common, "--precompute_ref_log_probs") == 0
    files = sorted((tmp_path / "cache" / "ref_logps").glob("seq_logps-*.safetensors"))
    assert len(files) == 2  # train and eval
    stamps = [f.stat().st_mtime_ns for f in files]
    assert _run(tiny_model_dir, pairs_file, tmp_path / "again", *common, "--precompute_ref_log_probs") == 0
    assert [f.stat().st_mtime_ns for f in files] == stamps
    live, pre = read_metrics(tmp_path / "live" / "metrics.jsonl"), read_metrics(tmp_path / "pre" / "metrics.jsonl")
    assert len(live) == len(pre) == 6  # 5 steps and one evaluation
    _same(live, pre, (*STEP_KEYS, "eval_loss", "eval_kl", "eval_rewards/chosen"), abs_=1e-6)
    apo = ["--max_steps", 2, "--loss_type", "apo_zero_unpaired"]  # no KL pairs to cache
    assert _run(tiny_model_dir, pairs_file, tmp_path / "apo_live", *apo) == 0
    assert _run(tiny_model_dir, pairs_file, tmp_path / "apo_pre", *apo, "--precompute_ref_log_probs") == 0
    _same(read_metrics(tmp_path / "apo_live" / "metrics.jsonl"), read_metrics(tmp_path / "apo_pre" / "metrics.jsonl"),
          abs_=1e-6)


@pytest.mark.parametrize(("extra", "message"), [
    (["--loss_type", "kto_pair"], "--loss_type: unknown loss 'kto_pair'; valid losses: kto, apo_zero_unpaired, bco"),
    (["--per_device_train_batch_size", 1], "--per_device_train_batch_size: an optimizer step needs at least 2"),
    (["--sync_ref_model", "--use_peft"], "--sync_ref_model: a LoRA policy's reference is its own base"),
    (["--label_column", "chosen"], "pairs.jsonl:1: column 'chosen' must be true/false"),
])
def test_bad_input_is_one_line_error_before_training(tiny_model_dir, pairs_file, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert _run(tiny_model_dir, pairs_file, out, "--max_steps", 1, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (out / "metrics.jsonl").exists()


def test_weights_scale_the_losses(tiny_model_dir, pairs_file, tmp_path):
    """Step 1 (all r = z = 0, so each loss is 0.5): (λ_D·n_D·0.5 + λ_U·n_U·0.5) / 4 over the step's 4 examples. The 8
    pairs unpair to examples 0-7 desirable (chosen) and 8-15 undesirable, TRL's order."""
    from prefalign.train.loop import shuffled_groups

    out = tmp_path / "w"
    assert _run(tiny_model_dir, pairs_file, out, "--max_steps", 1, "--desirable_weight", 2.0,
                "--undesirable_weight", 0.5, "--seed", 1) == 0
    first = read_metrics(out / "metrics.jsonl")[0]
    n_d = sum(i < 8 for i in shuffled_groups(16, 4, seed=1, epoch=0)[0])
    assert 0 < n_d < 4  # the case says something about both weights
    assert first["loss"] == pytest.approx((2.0 * n_d * 0.5 + 0.5 * (4 - n_d) * 0.5) / 4, abs=1e-6)


@pytest.mark.slow
def test_two_processes_ddp_and_fsdp_match_one_with_accumulation(tiny_model_dir, tmp_path):
    """2 processes x batch 2 (DDP, and FSDP from configs/accelerate/fsdp.yaml) log what 1 process x batch 2 x
    accumulation 2 logs: z is reduced over the processes' KL pairs of the step. 9 pairs (18 examples) make the last
    step ragged (1 micro-batch for 2 processes: the other runs a padding batch, its KL forwards included)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from test_fsdp import launch_env

    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(9))
    common = ["kto", "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--max_steps", "5",
              "--logging_steps", "1", "--disable_tqdm", "--learning_rate", "1e-3", "--per_device_train_batch_size", "2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src"), "OMP_NUM_THREADS": "1"}
    torchrun = [shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun", "--nproc_per_node",
                "2", "-m", "prefalign.cli"]
    runs = {"one": ([sys.executable, "-m", "prefalign.cli", *common, "--gradient_accumulation_steps", "2"], {}),
            "ddp": ([*torchrun, *common], {}),
            "fsdp": ([*torchrun, *common], launch_env("configs/accelerate/fsdp.yaml"))}
    logged = {}
    for name, (cmd, extra_env) in runs.items():
        done = subprocess.run([*cmd, "--output_dir", str(tmp_path / name)], env={**env, **extra_env},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        logged[name] = read_metrics(tmp_path / name / "metrics.jsonl")
    for name in ("ddp", "fsdp"):
        _same(logged["one"], logged[name], (*STEP_KEYS, "num_tokens"), rel=1e-4, abs_=1e-6)
