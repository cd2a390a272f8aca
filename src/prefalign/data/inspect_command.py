"""`prefalign data inspect`: the tool to reach for when a DPO run misbehaves."""

from __future__ import annotations

from dataclasses import dataclass

from prefalign.config import DataArgs, ModelArgs
from prefalign.errors import PrefalignError


@dataclass
class InspectConfig(DataArgs, ModelArgs):
    row: int | None = None
    """Show this row (0-based) in detail (default: the first)."""


CONFIG = InspectConfig


def run_command(cfg: InspectConfig) -> None:
    from prefalign.data.inspect import inspect_dataset
    from prefalign.model.load import load_tokenizer
    from prefalign.train.run import require

    if not cfg.model_name_or_path and not cfg.tokenizer_name_or_path:
        raise PrefalignError("is required (the tokenizer to render with)", "--model_name_or_path")
    require(cfg, "dataset_name")
    tokenizer = load_tokenizer(cfg)
    print(inspect_dataset(cfg, tokenizer, row=cfg.row))
