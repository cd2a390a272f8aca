"""Directories written completely or not at all: the one way checkpoints and final models reach the disk.

A writer fills a hidden temporary directory beside the target (`staging_dir`), then publishes it with renames:
a checkpoint replaces its directory whole (`publish_dir`), a final model moves its files into output_dir, next to
the run's logs (`publish_into`). A crash at any moment leaves the previous state or the new one, never half of it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def staging_dir(parent: Path, label: str, main: bool) -> Path:
    """`parent/.tmp-<label>-<pid>`, created empty by the main process (the others only learn its name)."""
    tmp = Path(parent) / f".tmp-{label}-{os.getpid()}"
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    return tmp


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` (the same step saved again) is swapped out first, then removed."""
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def publish_into(tmp: Path, out: Path) -> None:
    """Move every item of `tmp` into `out`, replacing same-named ones, then remove `tmp`."""
    for item in tmp.iterdir():
        target = out / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)
    tmp.rmdir()
