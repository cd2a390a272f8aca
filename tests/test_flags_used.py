"""Every flag a command's --help lists is one that command reads.

Each command runs once, for real, on tiny data, with its config object swapped for a subclass that records every
read of a field and which function made it. A field counts as used when code other than a check reads it: a
flag read only by `check_*` / `require` (validated, then ignored) is as misleading in --help as one never read.
The runs turn on the branches that read optional flags (LoRA, an evaluation set, an invalid row with
--skip_invalid_rows, a checkpoint with --save_total_limit, cosine_with_min_lr, raw and chat rows, beta != 0).
What no single run can read is listed in UNREAD_BY_DESIGN with the reason; the test fails when a listed flag
becomes read (the list shrinks) or when a flag is listed but is not the command's.

`prefalign demo` runs the whole pipeline (minutes): its flags are checked against the demo's source instead.
The same runs also check that every training stage prints its start-of-run block and closing line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import sys
from pathlib import Path

import pytest

from helpers import conv, write_jsonl
from prefalign.argparsing import parse_config
from prefalign.commands import COMMANDS, config_class, runner

# Reads made by these are not uses: generated dataclass methods (and the dataclasses module: asdict, replace).
_NOT_A_USE = {"__repr__", "__eq__"}
_CHECK = re.compile(r"^_?(check_|check$|require$)")

# (command, flag) -> why a run here cannot read it; each one is a flag read only on another branch.
UNREAD_BY_DESIGN = {
    **{(c, "eval_split_ratio"): "read only without --eval_dataset_name (the run gives one)"
       for c in ("dpo", "kto", "rm", "sft", "pretrain", "grpo", "rloo", "ppo", "online-dpo", "distill")},
    **{(c, "ignore_data_skip"): "read only when resuming from a checkpoint"
       for c in ("dpo", "kto", "rm", "sft", "pretrain", "grpo", "rloo", "ppo", "online-dpo", "distill")},
    **{(c, flag): why for c in ("dpo", "kto", "sft", "pretrain", "grpo", "rloo", "ppo", "online-dpo", "distill")
       for flag, why in (
        ("freeze_vision_tower", "read only for a vision-language model (the tiny model is text-only)"),
        ("ignore_adapter_base", "read only with --peft_adapter_path"))},
    **{(c, flag): "read only with --load_in_4bit (tests/model/test_qlora.py runs it)"
       for c in ("dpo", "kto", "rm", "sft", "pretrain", "grpo", "rloo", "ppo", "online-dpo", "distill")
       for flag in ("bnb_4bit_quant_type", "use_bnb_nested_quant")},
    **{(c, flag): "read only with --sync_ref_model" for c in ("dpo", "kto")
       for flag in ("ref_model_mixup_alpha", "ref_model_sync_steps")},
    ("data inspect", "completion_column"): "read only for unpaired (KTO) rows; the run inspects pairs",
    **{(c, "reward_chat_template"): "read only with --reward_model_name_or_path (the runs score with functions)"
       for c in ("grpo", "rloo", "ppo", "online-dpo", "eval")},
}
# Flags read only by a check: kept in --help on purpose, each with the reason.
CHECK_ONLY = {
    **{(c, "use_vllm"): "refused with a one-line error until the vLLM backend exists"
       for c in ("grpo", "rloo", "ppo", "online-dpo")},
}


def _recording(cfg):
    """`cfg` with its class swapped for a subclass recording {field: "used" | "checked"}."""
    names = {f.name for f in dataclasses.fields(cfg)}
    reads: dict[str, str] = {}

    def __getattribute__(self, name):
        if name in names:
            caller = sys._getframe(1).f_code
            if caller.co_name not in _NOT_A_USE and not caller.co_filename.endswith(("dataclasses.py", "<string>")):
                kind = "checked" if _CHECK.match(caller.co_name) or caller.co_filename.endswith("checks.py") else "used"
                if reads.get(name) != "used":
                    reads[name] = kind
        return object.__getattribute__(self, name)

    cfg.__class__ = type(type(cfg).__name__, (type(cfg),), {"__getattribute__": __getattribute__})
    return cfg, reads


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("flags")
    bad = {"nothing": "useful"}
    pairs = [{"prompt": conv(("user", f"what is {i} plus {i}")), "chosen": conv(("assistant", str(2 * i))),
              "rejected": conv(("assistant", "no"))} for i in range(4)]
    pairs += [{"prompt": "what is one", "chosen": " one", "rejected": " two"}, bad]
    sft = [{"messages": conv(("user", "hi"), ("assistant", "hello"))}, {"prompt": "the sky is", "completion": " blue"},
           {"text": "hello world"}, bad]
    prompts = [{"prompt": conv(("user", f"what is {i} + {i}")), "answer": str(2 * i)} for i in range(3)]
    prompts += [{"prompt": "what is 1 + 1", "answer": "2"}, bad]
    out = {"pairs": write_jsonl(d / "pairs.jsonl", pairs), "sft": write_jsonl(d / "sft.jsonl", sft),
           "sft_prompted": write_jsonl(d / "sft_prompted.jsonl", sft[:2] * 2 + [bad]),
           "prompts": write_jsonl(d / "prompts.jsonl", prompts), "dir": d, "model": tiny_model_dir}
    (d / "corpus.txt").write_text("hello world the sky is blue\nwhat is the answer\n" * 20)
    out["corpus"] = d / "corpus.txt"
    out["docs"] = write_jsonl(d / "docs.jsonl", [{"text": "hello world the sky is blue " * 4}] * 6 + [bad])
    for sub, marker in (("init", "config.json"), ("tok", "tokenizer.json")):  # earlier results, overwritten
        (d / sub).mkdir()
        (d / sub / marker).write_text("{}")
    (d / "recipe.yaml").write_text(f"- {{stage: sft, model_name_or_path: {tiny_model_dir}, dataset_name: {out['sft']}, "
                                   f"output_dir: {d / 'pipe'}}}\n")
    return out


TRAIN = ["--num_train_epochs", "1", "--save_steps", "1", "--save_total_limit", "1", "--logging_steps", "1",
         "--lr_scheduler_type", "cosine_with_min_lr", "--disable_tqdm", "--report_to", "none", "--skip_invalid_rows"]


def _argv(name: str, f: dict) -> list[str]:
    d, model = f["dir"], str(f["model"])
    common = ["--model_name_or_path", model, "--output_dir", str(d / name), *TRAIN]
    rl = ["--dataset_name", str(f["prompts"]), "--eval_dataset_name", str(f["prompts"]), "--reward_funcs", "length:3",
          "--max_completion_length", "4", "--prompt_template", "Q: {prompt}", "--system_prompt", "be brief"]
    return {
        "dpo": [*common, "--dataset_name", str(f["pairs"]), "--eval_dataset_name", str(f["pairs"]), "--use_peft",
                "--per_device_train_batch_size", "2", "--prompt_template", "Q: {prompt}", "--system_prompt", "x"],
        "kto": [*common, "--dataset_name", str(f["pairs"]), "--eval_dataset_name", str(f["pairs"]), "--use_peft",
                "--per_device_train_batch_size", "2", "--prompt_template", "Q: {prompt}", "--system_prompt", "x"],
        "rm": [*common, "--dataset_name", str(f["pairs"]), "--eval_dataset_name", str(f["pairs"]), "--use_peft",
               "--per_device_train_batch_size", "2", "--prompt_template", "Q: {prompt}", "--system_prompt", "x"],
        "sft": [*common, "--dataset_name", str(f["sft"]), "--eval_dataset_name", str(f["sft"]), "--use_peft",
                "--per_device_train_batch_size", "2", "--prompt_template", "Q: {prompt}", "--system_prompt", "x",
                "--neftune_noise_alpha", "5"],
        "pretrain": [*common, "--dataset_name", str(f["docs"]), "--eval_dataset_name", str(f["docs"]),
                     "--max_length", "16", "--use_peft", "--per_device_train_batch_size", "2"],
        "grpo": [*common, *rl, "--use_peft", "--num_generations", "2", "--per_device_train_batch_size", "4",
                 "--beta", "0.1", "--ref_model_name_or_path", model],
        "rloo": [*common, *rl, "--use_peft", "--per_device_train_batch_size", "4", "--ref_model_name_or_path", model],
        "ppo": [*common, *rl, "--use_peft", "--per_device_train_batch_size", "2", "--ref_model_name_or_path", model],
        "online-dpo": [*common, *rl, "--use_peft", "--per_device_train_batch_size", "2", "--ref_model_name_or_path",
                       model, "--missing_eos_penalty", "1.0", "--mask_truncated_completions", "--use_weighting",
                       "--rpo_alpha", "0.5", "--dpop_lambda", "1.0", "--ld_alpha", "0.5"],
        "distill": [*common, "--dataset_name", str(f["sft_prompted"]), "--eval_dataset_name", str(f["sft_prompted"]),
                    "--use_peft", "--teacher_model_name_or_path", model, "--per_device_train_batch_size", "2",
                    "--max_new_tokens", "3", "--lmbda", "0.5", "--seq_kd", "--prompt_template", "Q: {prompt}",
                    "--system_prompt", "x"],
        "eval": ["--model_name_or_path", model, "--ref_model_name_or_path", model, "--dataset_name", str(f["pairs"]),
                 "--skip_invalid_rows", "--num_samples", "1", "--temperature", "0.5", "--max_new_tokens", "2",
                 "--prompt_template", "Q: {prompt}", "--system_prompt", "x", "--output_json", str(d / "eval.json")],
        "chat": ["--model_name_or_path", model, "--prompt", "hi", "--max_new_tokens", "2", "--seed", "1",
                 "--system_prompt", "be brief"],
        "data inspect": ["--model_name_or_path", model, "--dataset_name", str(f["pairs"]), "--row", "4",
                         "--prompt_template", "Q: {prompt}", "--system_prompt", "x"],
        "init-model": ["--tokenizer", model, "--output_dir", str(d / "init"), "--hidden_size", "16",
                       "--num_attention_heads", "2", "--num_hidden_layers", "1", "--overwrite_output_dir"],
        "train-tokenizer": ["--dataset_name", str(f["corpus"]), "--vocab_size", "300", "--output_dir", str(d / "tok"),
                            "--overwrite_output_dir"],
        "pipeline": ["--recipe", str(d / "recipe.yaml"), "--dry_run"],
        "plot": ["--run_dir", str(d / "dpo")],  # after dpo has run (sorted order)
    }[name]


RUN_ORDER = ["dpo", "kto", "rm", "sft", "pretrain", "grpo", "rloo", "ppo", "online-dpo", "distill", "eval", "chat", "data inspect", "init-model",
             "train-tokenizer", "pipeline", "plot"]


@pytest.fixture(scope="module")
def runs(files):
    """{command: ({field: "used" | "checked"}, what it printed)} over one real run of each command."""
    out = {}
    for name in RUN_ORDER:
        cfg, seen = _recording(parse_config(config_class(name), _argv(name, files), prog=f"prefalign {name}"))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
            runner(name)(cfg)
        out[name] = (seen, printed.getvalue())
    return out


def test_every_command_is_run_here():
    assert sorted([*RUN_ORDER, "demo"]) == sorted(COMMANDS)


@pytest.mark.slow
@pytest.mark.parametrize("name", RUN_ORDER)
def test_every_listed_flag_is_read(runs, name):
    fields = {f.name for f in dataclasses.fields(config_class(name))}
    seen = runs[name][0]
    exempt = {flag for (cmd, flag) in UNREAD_BY_DESIGN if cmd == name}
    check_only = {flag for (cmd, flag) in CHECK_ONLY if cmd == name}
    assert exempt | check_only <= fields  # the tables name only this command's flags
    unread = sorted(fields - set(seen) - exempt)
    # the generic checks (finite numbers, ranges) read every field: a branch-only flag is seen as checked
    checked = sorted(f for f, kind in seen.items() if kind == "checked" and f not in check_only | exempt)
    assert (unread, checked) == ([], []), f"prefalign {name} --help lists flags it never reads {unread} / only checks {checked}"
    assert not {f for f in exempt if seen.get(f) == "used"}, "a flag listed in UNREAD_BY_DESIGN is read now: drop it"
    assert {f for f in check_only if seen.get(f) == "used"} == set(), "a CHECK_ONLY flag is used now: drop it"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dpo", "kto", "rm", "sft", "pretrain", "grpo", "rloo", "ppo", "online-dpo",
                                  "distill"])
def test_every_training_stage_prints_the_start_block_and_closing_line(runs, name, files):
    """The same runs: one start block per stage with every field, before the closing line with the throughput."""
    printed = runs[name][1].splitlines()
    start = printed.index(f"{name}: starting")
    labels = [line[2:13].strip() for line in printed[start + 1:] if line.startswith("  ")]
    assert {"data", "steps", "batch", "parameters", "layout", "reference", "output"} <= set(labels)
    assert printed[start + 1].startswith("  data        train: ")
    assert f"  output      {files['dir'] / name}" in printed
    assert "LoRA r=16" in next(line for line in printed if line.startswith("  parameters"))
    assert re.fullmatch(rf"{name}: \d+ steps, .*; \S+ tokens/s, .* s training, .* in all; .* saved to "
                        rf"{re.escape(str(files['dir'] / name))}", printed[-1]), printed[-1]


def test_demo_flags_appear_in_its_code():
    source = "".join(p.read_text() for p in Path(__file__).parents[1].glob("src/prefalign/demo/*.py"))
    fields = {f.name for f in dataclasses.fields(config_class("demo"))}
    assert {f for f in fields if f"cfg.{f}" not in source} == set()
