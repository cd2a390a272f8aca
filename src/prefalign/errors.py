"""The one exception type a user ever sees.

Every problem caused by input (a bad row, a missing model, an unknown flag value) is raised as a
PrefalignError. The CLI prints it as one line on stderr and exits with code 2; no traceback.
"""

from __future__ import annotations


class PrefalignError(Exception):
    """A user-facing error: `where` names the file/line/flag, `reason` says what is wrong."""

    def __init__(self, reason: str, where: str | None = None) -> None:
        self.reason = reason
        self.where = where
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}" if self.where else self.reason


class UserCodeError(PrefalignError):
    """The user's own code (a reward function, a reward file, a judge) raised: that code's traceback is worth
    keeping, since it points at their lines. The CLI prints the traceback of `__cause__`, then the one line."""
