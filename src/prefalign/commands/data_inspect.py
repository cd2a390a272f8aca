"""`prefalign data inspect`: the tool to reach for when a DPO run misbehaves."""

from __future__ import annotations

from prefalign.config import InspectConfig
from prefalign.config.checks import require
from prefalign.data.inspect import inspect_dataset
from prefalign.errors import PrefalignError
from prefalign.model.load import load_processing


def run_command(cfg: InspectConfig) -> None:
    if not cfg.model_name_or_path and not cfg.tokenizer_name_or_path:
        raise PrefalignError("is required (the tokenizer to render with)", "--model_name_or_path")
    require(cfg, "dataset_name")
    tokenizer, processor = load_processing(cfg)
    print(inspect_dataset(cfg, tokenizer, row=cfg.row, processor=processor))
