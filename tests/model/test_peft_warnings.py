"""A LoRA run prints no FutureWarning: peft 0.21.2 reads transformers' deprecated `is_gradient_checkpointing` when it
wraps a model (model.load.peft_wrapping). Checked on a real run, with checkpointing on, and on reloading the
adapter for inference, with every warning recorded."""

from __future__ import annotations

import warnings

from helpers import conv, run_cli, write_jsonl
from prefalign.model.load import load_model_for_inference


def test_lora_run_and_reload_emit_no_future_warning(tiny_model_dir, tmp_path):
    rows = [{"prompt": conv(("user", f"what is {i} plus {i}")), "chosen": conv(("assistant", str(2 * i))),
             "rejected": conv(("assistant", "no"))} for i in range(4)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_cli("dpo", tiny_model_dir, data, tmp_path / "out", "--use_peft", "--gradient_checkpointing",
                       "--max_steps", "1", "--per_device_train_batch_size", "4") == 0
        load_model_for_inference(str(tmp_path / "out"))
    future = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if issubclass(w.category, FutureWarning)]
    assert future == []
