"""SIGTERM handled like Ctrl-C while the loop runs, so that either interrupt saves a resumable checkpoint."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM and Kubernetes send before killing a job), raised like Ctrl-C's KeyboardInterrupt so that
    the loop saves a resumable checkpoint either way."""

    signum = signal.SIGTERM


def sigterm_as_interrupt() -> Callable[[], None]:
    """Make SIGTERM raise Terminated until the returned function restores the previous handler. Handlers can only be
    set from the main thread: elsewhere (a notebook's worker thread) SIGTERM keeps its own behaviour."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)
