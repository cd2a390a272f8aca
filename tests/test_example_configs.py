"""Every example recipe in configs/ parses into its command's config."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefalign.argparsing import parse_config
from prefalign.config import DPOConfig, KTOConfig

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("dpo_*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_dpo_recipes_parse(path):
    cfg = parse_config(DPOConfig, ["--config", str(path)], "dpo")
    assert cfg.beta > 0


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("kto_*.yaml")), ids=lambda p: p.name)
def test_kto_recipes_parse(path):
    cfg = parse_config(KTOConfig, ["--config", str(path)], "kto")
    assert cfg.beta > 0 and cfg.loss_type == "kto"
