"""One exception tree for the whole package (no torch import).

Every error a user can cause is an ``AsamTuneError``; the CLI prints its message on one line
and exits with code 2. Messages carry the bad value, as torch.optim's do.
"""
from __future__ import annotations


class AsamTuneError(Exception):
    """Base class of every error asam-tune raises on purpose."""


class UserInputError(AsamTuneError, ValueError):
    """A wrong flag, argument or value supplied by the user."""


class RecordError(UserInputError):
    """A profile or plan document that cannot be read or does not validate.

    The message names the file, the JSON path and what was expected versus found.
    """

    def __init__(self, source: str, path: str, expected: str, actual: object):
        self.source = source
        self.path = path
        self.expected = expected
        self.actual = actual
        super().__init__(f"{source}: at {path}: expected {expected}, got {actual!r}")


class WorkloadError(UserInputError):
    """A workload name or ``package.module:factory`` that cannot give a model."""


class FingerprintMismatchError(AsamTuneError):
    """A plan or profile made on another machine is used here without permission."""


class WorkerError(AsamTuneError):
    """The perturbation worker died, hung or raised."""

    def __init__(self, message: str, *, pid: int | None = None, signal: int | None = None,
                 remote_traceback: str | None = None):
        self.pid = pid
        self.signal = signal
        self.remote_traceback = remote_traceback
        super().__init__(message)


__all__ = [
    "AsamTuneError",
    "UserInputError",
    "RecordError",
    "WorkloadError",
    "FingerprintMismatchError",
    "WorkerError",
]
