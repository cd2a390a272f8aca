"""A run's output directory keeps the user's work safe: overwrite retires the old run whole, a resume refuses what
breaks it (and names what changed), damaged or foreign checkpoints are named in one line, the input model is never
the output, and an unwritable or full disk is one line before (or instead of) a traceback. Tiny DPO runs end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import build_model, conv, run_cli, write_jsonl
from prefalign.errors import PrefalignError
from prefalign.train.checkpoint import list_checkpoints, resolve_checkpoint
from prefalign.train.metrics import read_metrics

ROOT = Path(__file__).parents[2]


def _pairs(n: int, offset: int = 0) -> list[dict]:
    return [{"prompt": conv(("user", f"what is {i} + 1")), "chosen": conv(("assistant", f"{i + 1}")),
             "rejected": conv(("assistant", f"{i + 2 + offset} no"))} for i in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("pairs")
    return write_jsonl(d / "a.jsonl", _pairs(12)), write_jsonl(d / "b.jsonl", _pairs(12, offset=3))


def _dpo(model, data, out, *extra) -> int:
    return run_cli("dpo", model, data, out, "--per_device_train_batch_size", 2, "--learning_rate", 1e-3, *extra)


def _err(capsys) -> str:
    return capsys.readouterr().err.strip()


def test_overwrite_retires_the_whole_earlier_run(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _dpo(tiny_model_dir, data[0], out, "--max_steps", 4, "--save_steps", 2) == 0
    (out / "notes.txt").write_text("mine")  # not something a run writes: left alone
    assert _dpo(tiny_model_dir, data[1], out, "--max_steps", 3, "--save_steps", 0, "--overwrite_output_dir") == 0
    assert "the earlier run in" in capsys.readouterr().out
    assert list_checkpoints(out) == []  # the old run's checkpoint-2 is gone with the rest of it
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    assert json.loads((out / "prefalign_config.json").read_text())["dataset_name"] == str(data[1])
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # moved aside, deleted after save
    assert (out / "notes.txt").read_text() == "mine"
    assert _dpo(tiny_model_dir, data[1], out, "--max_steps", 5, "--resume_from_checkpoint", "latest") == 2
    assert "no checkpoint found" in _err(capsys)


def test_resume_refuses_other_data_warns_on_other_settings_and_keeps_both_configs(tiny_model_dir, data, tmp_path,
                                                                                 capsys):
    out = tmp_path / "run"
    assert _dpo(tiny_model_dir, data[0], out, "--max_steps", 4, "--save_steps", 2) == 0  # checkpoint-2
    capsys.readouterr()
    for flag, value in (("--dataset_name", data[1]), ("--per_device_train_batch_size", 4), ("--seed", 7)):
        argv = ["--max_steps", 4, "--resume_from_checkpoint", "latest"]
        if flag == "--dataset_name":
            code = run_cli("dpo", tiny_model_dir, value, out, "--per_device_train_batch_size", 2, "--learning_rate",
                           1e-3, *argv)
        else:
            code = _dpo(tiny_model_dir, data[0], out, flag, value, *argv)
        assert code == 2
        err = _err(capsys)
        assert err.startswith("prefalign dpo: error: --resume_from_checkpoint latest: checkpoint-2 was trained with "
                              f"{flag[2:]} "), err
        assert err.endswith("pass --ignore_data_skip to continue its weights and optimizer on the data from the start")
    # consent: the data restarts; a changed learning rate is named; the config before the resume is kept
    assert _dpo(tiny_model_dir, data[0], out, "--max_steps", 4, "--resume_from_checkpoint", "latest", "--seed", 7,
                "--ignore_data_skip", "--learning_rate", 2e-3) == 0
    said = capsys.readouterr().out
    assert "Resuming checkpoint-2 with changed settings: learning_rate 0.001 -> 0.002" in said
    assert "(--ignore_data_skip: the data starts from its beginning)" in said
    assert json.loads((out / "prefalign_config.until-step-2.json").read_text())["learning_rate"] == 1e-3
    assert json.loads((out / "prefalign_config.json").read_text())["learning_rate"] == 2e-3
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_damaged_and_foreign_checkpoints_are_named(tiny_model_dir, tiny_tokenizer, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _dpo(tiny_model_dir, data[0], out, "--max_steps", 5, "--save_steps", 2) == 0
    weights = out / "checkpoint-4" / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    capsys.readouterr()
    assert _dpo(tiny_model_dir, data[0], out, "--max_steps", 5, "--resume_from_checkpoint", "latest") == 0
    said = capsys.readouterr().out
    assert f"skipping checkpoint-4 (model.safetensors: truncated ({size // 2} of {size} bytes))" in said
    assert "Resuming from" in said and "checkpoint-2 at step 2" in said
    assert _dpo(tiny_model_dir, data[0], out, "--max_steps", 5, "--resume_from_checkpoint", weights.parent) == 2
    assert _err(capsys) == f"prefalign dpo: error: {weights}: cannot resume: truncated ({size // 2} of {size} bytes)"
    # a checkpoint of another model (same data and flags) copied in: one line naming its weights
    other = tmp_path / "wide"
    build_model(other, tiny_tokenizer, hidden_size=64)
    foreign = tmp_path / "foreign"
    assert _dpo(other, data[0], foreign, "--max_steps", 3, "--save_steps", 2) == 0
    capsys.readouterr()
    assert _dpo(tiny_model_dir, data[0], out, "--max_steps", 5, "--resume_from_checkpoint",
                foreign / "checkpoint-2") == 2
    err = _err(capsys)
    assert err.startswith(f"prefalign dpo: error: {foreign / 'checkpoint-2' / 'model.safetensors'}: does not fit this "
                          "model (") and "size mismatch" in err and "\n" not in err
    assert _dpo(tiny_model_dir, data[0], out, "--resume_from_checkpoint", tmp_path / "nope") == 2
    assert _err(capsys) == f"prefalign dpo: error: --resume_from_checkpoint {tmp_path / 'nope'}: does not exist"


def test_a_checkpoint_of_another_command_is_refused(tmp_path):
    from prefalign.config import DPOConfig
    from prefalign.train.run_dir import check_resume

    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 3, "config_class": "SFTConfig"}))
    with pytest.raises(PrefalignError, match="was written by prefalign sft, not dpo"):
        check_resume(DPOConfig(output_dir=str(tmp_path), resume_from_checkpoint="latest"), ckpt)


def test_advice_after_a_run_without_checkpoints_is_not_to_resume(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _dpo(tiny_model_dir, data[0], out, "--max_steps", 1) == 0
    (out / "model.safetensors").unlink()  # as if killed before its end: logs only
    capsys.readouterr()
    assert _dpo(tiny_model_dir, data[0], out, "--max_steps", 1) == 2
    assert _err(capsys) == (f"prefalign dpo: error: --output_dir {out}: already holds an earlier run (config.json) "
                            "with no checkpoint to resume; pass --overwrite_output_dir to replace it, or choose another "
                            "directory")


def test_output_dir_that_is_the_input_model_is_refused(tiny_model_dir, tiny_tokenizer, data, tmp_path, capsys):
    model = tmp_path / "model"
    build_model(model, tiny_tokenizer)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    assert _dpo(model, data[0], model, "--max_steps", 1, "--overwrite_output_dir") == 2
    assert _err(capsys) == (f"prefalign dpo: error: --output_dir {model}: is also --model_name_or_path: the run would "
                            "write over its own input; choose another directory")
    shutil.copytree(model, tmp_path / "run" / "merged")
    assert _dpo(tmp_path / "run" / "merged", data[0], tmp_path / "run", "--max_steps", 1,
                "--overwrite_output_dir") == 2
    assert "which --overwrite_output_dir would clear" in _err(capsys)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


@pytest.fixture()
def mount(tmp_path):
    """mount(size, ro) -> a fresh tmpfs directory (needs root and mount(2); else the test says why it skips)."""
    mounted = []

    def make(size: str, read_only: bool = False) -> Path:
        target = tmp_path / f"fs{len(mounted)}"
        target.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(target)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(target)
        return target

    yield make
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_read_only_output_dir_is_one_line_before_training(tiny_model_dir, data, mount, capsys):
    ro = mount("1m", read_only=True)
    assert _dpo(tiny_model_dir, data[0], ro / "run", "--max_steps", 1) == 2
    assert _err(capsys) == (f"prefalign dpo: error: --output_dir {ro / 'run'}: is not writable (Read-only file "
                            f"system in {ro})")


def test_disk_full_during_a_checkpoint_save(tiny_model_dir, data, tmp_path, capsys):
    """A real full disk: a 1.5 MB tmpfs where the first checkpoint(s) fit and a later one does not. Without mount(2),
    a real file-size limit (RLIMIT_FSIZE, errno EFBIG) in a subprocess stops the first checkpoint's save instead."""
    target = tmp_path / "small"
    target.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(target)],
                             capture_output=True).returncode == 0
    out = target / "run"
    argv = ["--max_steps", 4, "--save_steps", 1]
    try:
        if mounted:
            code, err = _dpo(tiny_model_dir, data[0], out, *argv), _err(capsys)
            failed = int(err.split("/checkpoint-")[1].split(":")[0])
            assert failed > 1, err
            full, kept = "No space left on device", f"the latest complete checkpoint is checkpoint-{failed - 1}: resume"
        else:
            code, err = _limited_file_size(tiny_model_dir, data[0], out, [str(a) for a in argv])
            full, kept = "File too large", "no checkpoint was written"
        assert code == 2, err
        assert err.startswith(f"prefalign dpo: error: {out}/checkpoint-"), err
        assert f"the disk is full ({full}) while saving; the partial save was removed; {kept}" in err
        assert "\n" not in err
        assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
        if mounted:
            assert resolve_checkpoint("latest", out).name == f"checkpoint-{failed - 1}"
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(target)], check=False)


def _limited_file_size(model, data, out, argv) -> tuple[int, str]:
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000)); "
            "from prefalign.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "dpo", "--model_name_or_path", str(model), "--dataset_name",
                           str(data), "--output_dir", str(out), "--per_device_train_batch_size", "2",
                           "--disable_tqdm", *argv], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=300)
    return done.returncode, done.stderr.strip().splitlines()[-1]
