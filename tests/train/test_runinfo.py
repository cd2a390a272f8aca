"""What a run tells its user: the start-of-run block, the progress bar's postfix and the closing line.

The block is checked line by line on a real LoRA DPO run (counts derived from the data and flags by hand), and
piece by piece on a fresh model with hand-counted parameters; the closing line's tokens/s is checked against the
tokens the loop really trained on. Every other training stage's block is checked in tests/test_flags_used.py, which
runs each command once.
"""

from __future__ import annotations

import re

from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from helpers import conv, run_cli, write_jsonl
from prefalign.config import DPOConfig, SFTConfig
from prefalign.data.tokenize import TokenizeStats, Truncation, load_tokenized_pairs
from prefalign.model.load import load_tokenizer
from prefalign.stages.dpo import train_dpo
from prefalign.train.loop import BAR_FORMAT, LoopPlan, _postfix
from prefalign.train.metrics import human
from prefalign.train.runinfo import (
    RunFacts,
    SplitCount,
    duration,
    parameter_counts,
    start_block,
    summary_numbers,
)


def _pairs(n: int) -> list[dict]:
    return [{"prompt": conv(("user", f"what is {i} plus {i}")), "chosen": conv(("assistant", str(2 * i))),
             "rejected": conv(("assistant", "no"))} for i in range(n)]


def test_start_block_and_closing_line_of_a_lora_dpo_run(tiny_model_dir, tmp_path, capsys):
    rows = _pairs(10) + [_pairs(1)[0] | {"rejected": _pairs(1)[0]["chosen"]}]  # an 11th pair, chosen == rejected
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    assert run_cli("dpo", tiny_model_dir, data, out, "--use_peft", "--lora_r", "4", "--num_train_epochs", "2",
                   "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                   "--eval_dataset_name", data) == 0
    printed = capsys.readouterr().out.splitlines()
    start = printed.index("dpo: starting")
    block = printed[start:start + 9]
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    total = sum(p.numel() for p in lora.parameters())
    assert block == [
        "dpo: starting",
        "  data        train: 10 of 11 pairs kept (prompt truncated 0, completion truncated 0, dropped 1 "
        "(chosen and rejected are identical: 1))",
        "              eval: 10 of 11 pairs kept (prompt truncated 0, completion truncated 0, dropped 1 "
        "(chosen and rejected are identical: 1))",
        # 10 pairs / 2 per micro-batch = 5 micro-batches, 2 per step: 3 steps an epoch, 2 epochs
        "  steps       6 optimizer steps (2 epochs of 3)",
        "  batch       4 pairs per optimizer step = 2 per device x 2 accumulation x 1 process",
        f"  parameters  {trainable / 1e3:.1f}K trainable of {total / 1e3:.1f}K "
        f"({100 * trainable / total:.3g}%, LoRA r=4)",
        "  layout      packed (padding-free), shared prompt",
        "  reference   the base model with the LoRA adapter disabled (no copy)",
        f"  output      {out}",
    ]
    assert trainable < total
    final = printed[-1]
    m = re.fullmatch(r"dpo: 6 steps, loss=\S+, rewards/accuracies=\S+, rewards/margins=\S+, "
                     r"eval_rewards/accuracies=\S+; ([\d.]+[KMB]?) tokens/s, ([\d.]+) s training, ([\d.]+) s in all; "
                     rf"model saved to {re.escape(str(out))}", final)
    assert m and float(m[2]) <= float(m[3]), final


def test_loop_result_counts_the_tokens_it_trained_on(tiny_model_dir, tmp_path):
    """tokens/s in the closing line is the loop's trained tokens over its wall time: 2 epochs of every kept pair's
    unique tokens (prompt once, both answers)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(6))
    cfg = DPOConfig(model_name_or_path=str(tiny_model_dir), dataset_name=str(data), output_dir=str(tmp_path / "o"),
                    num_train_epochs=2, per_device_train_batch_size=4, disable_tqdm=True, logging_steps=1)
    result = train_dpo(cfg)
    pairs, _, _ = load_tokenized_pairs(cfg, load_tokenizer(cfg), Truncation.of(cfg))
    assert result.tokens == 2 * sum(p.num_tokens for p in pairs)
    assert 0 < result.train_seconds <= result.wall_seconds
    assert summary_numbers(result.tokens, result.train_seconds, result.wall_seconds).startswith(
        f"{human(result.tokens / result.train_seconds)} tokens/s, ")


def test_block_pieces_resume_full_weights_and_token_budget(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n = sum(p.numel() for p in model.parameters())
    assert parameter_counts(model) == (n, n)
    stats = TokenizeStats(total=5, kept=5)
    facts = RunFacts([SplitCount.of("train", stats, "pairs")], "pairs", "packed (padding-free), shared prompt",
                     "a frozen copy of the initial policy")
    args = DPOConfig(output_dir="o", max_steps=8, max_tokens_per_batch=256, gradient_accumulation_steps=2)
    lines = start_block("dpo", args, facts, model, LoopPlan(8, 3, 2), num_processes=4).splitlines()
    assert lines[2] == "  steps       8 optimizer steps (--max_steps; an epoch is 2), resuming at step 3"
    assert lines[3] == "  batch       micro-batches of up to 256 tokens x 2 accumulation x 4 processes"
    assert lines[4].endswith("(100%, full weights)")
    sft = SFTConfig(output_dir="o", per_device_train_batch_size=3)
    block = start_block("sft", sft, RunFacts([], "samples"), model, LoopPlan(4, 0, 4), num_processes=2)
    assert "  batch       6 samples per optimizer step = 3 per device x 1 accumulation x 2 processes" in block
    assert "  reference   none" in block and "  output      o" in block


def test_progress_bar_shows_eta_and_tokens_per_second():
    assert "ETA {remaining}" in BAR_FORMAT and "{elapsed}" in BAR_FORMAT

    class Stage:
        progress_keys = {"loss": "loss"}

    assert _postfix(Stage(), {"loss": 0.5}, tokens=2500.0, elapsed=2.0) == {"tok/s": "1.2K", "loss": "0.5"}
    assert _postfix(Stage(), {"loss": 0.5}, tokens=0.0, elapsed=2.0) == {"loss": "0.5"}  # nothing counted yet
    assert [duration(s) for s in (12.34, 754, 7384)] == ["12.3 s", "12 min 34 s", "2 h 03 min"]
