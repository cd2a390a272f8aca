"""prefalign: align language models with human preferences.

    from prefalign import DPOConfig, train_dpo
    train_dpo(DPOConfig(model_name_or_path="...", dataset_name="pairs.jsonl", output_dir="runs/dpo"))
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "DPOConfig": "prefalign.config",
    "train_dpo": "prefalign.stages.dpo",
    "KTOConfig": "prefalign.config",
    "train_kto": "prefalign.stages.kto",
    "PrefalignError": "prefalign.errors",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    # Lazy so that `import prefalign` (and the CLI's --help) does not pay for importing torch and transformers.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prefalign' has no attribute {name!r}")
