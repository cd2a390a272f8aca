"""Directories written completely or not at all: the one way checkpoints and final models reach the disk.

A writer fills a hidden temporary directory beside the target (`staging_dir`), then publishes it with renames:
a checkpoint replaces its directory whole (`publish_dir`), a final model moves its files into output_dir, next to
the run's logs (`publish_into`, weights last, so a directory never looks finished before it is). A crash at any
moment leaves the previous state or the new one, never half of it. `staged` removes the temporary directory when
the writer fails or is interrupted, and turns a full disk into one line naming the path; `remove_stale` clears what a
killed process left (its `.tmp-*` directory, or a checkpoint it had moved aside to replace). `retire` moves an
overwritten run aside, `drop_retired` deletes it once the new run has saved something.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefalign.errors import PrefalignError

# The weights of a final model: moved into output_dir last (see `is_finished` in train.setup).
_WEIGHTS_LAST = re.compile(r"(^model.*\.safetensors(\.index\.json)?$)|(^adapter_model\.safetensors$)")
_STALE = re.compile(r"^\.(tmp|old)-(.+)-(\d+)$")
_RETIRED = ".retired-"  # an overwritten run, moved aside until the new run has saved
# errno values, and the way Rust's std::io (safetensors) spells them, that mean the disk (or quota) is full
_FULL = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded", errno.EFBIG: "File too large"}


def staging_dir(parent: Path, label: str, main: bool) -> Path:
    """`parent/.tmp-<label>-<pid>`, created empty by the main process (the others only learn its name)."""
    tmp = Path(parent) / f".tmp-{label}-{os.getpid()}"
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    return tmp


def disk_full(error: BaseException) -> str | None:
    """The reason when `error` means the disk (or quota, or file size limit) is full, else None. torch and
    safetensors wrap the OSError in their own exceptions, so their message is read too."""
    if isinstance(error, OSError) and error.errno in _FULL:
        return _FULL[error.errno]
    text = str(error)
    for code, reason in _FULL.items():
        if reason in text or f"os error {code})" in text:
            return reason
    return None


@contextmanager
def staged(tmp: Path, what: str, main: bool) -> Iterator[None]:
    """Remove `tmp` if the block fails or is interrupted (a second Ctrl-C); a full disk becomes one PrefalignError
    naming `what` (the directory being written)."""
    try:
        yield
    except BaseException as e:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = disk_full(e)
        if reason is not None:
            raise PrefalignError(f"the disk is full ({reason}) while saving; the partial save was removed",
                                 what) from None
        raise


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
    """Move every item of `tmp` into `out`, replacing same-named ones, weights last, then remove `tmp`."""
    for item in sorted(tmp.iterdir(), key=lambda p: bool(_WEIGHTS_LAST.match(p.name))):
        target = out / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)
    tmp.rmdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale(root: Path) -> list[str]:
    """Clear what killed writers left in `root`: a `.tmp-*` staging directory is removed, and a checkpoint moved
    aside as `.old-checkpoint-N-PID` (killed between the two renames of `publish_dir`) is put back when its place
    is empty. Directories of other processes still running are left alone (this process writes synchronously, so
    its own leftovers are stale). Returns the names it removed."""
    removed: list[str] = []
    if not root.is_dir():
        return removed
    for item in root.iterdir():
        m = _STALE.match(item.name)
        if not m or not item.is_dir() or (int(m.group(3)) != os.getpid() and _alive(int(m.group(3)))):
            continue
        home = root / m.group(2)
        if m.group(1) == "old" and not home.exists():
            os.replace(item, home)
            continue
        shutil.rmtree(item, ignore_errors=True)
        removed.append(item.name)
    return removed


def retire(root: Path, names: list[str]) -> Path | None:
    """Move the items `names` of `root` into `root/.retired-<pid>` (one rename each, nothing copied), so that a new
    run never mixes with them; `drop_retired` deletes them once the new run has saved something."""
    present = [root / n for n in names if (root / n).exists() or (root / n).is_symlink()]
    if not present:
        return None
    aside = root / f"{_RETIRED}{os.getpid()}"
    aside.mkdir(exist_ok=True)
    for item in present:
        os.replace(item, aside / item.name)
    return aside


def drop_retired(root: Path) -> None:
    """Delete what `retire` moved aside in `root` (called after a new run's first checkpoint or final save)."""
    if root.is_dir():
        for item in root.glob(f"{_RETIRED}*"):
            shutil.rmtree(item, ignore_errors=True)
