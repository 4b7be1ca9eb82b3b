"""One exception tree for the whole package (no torch import).

Every error a user can cause is an ``AsamTuneError``; the CLI prints its message on one line
and exits with code 2. Messages carry the bad value, as torch.optim's do.
"""
from __future__ import annotations


def _rebuilt(cls: type, args: tuple, state: dict) -> AsamTuneError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class AsamTuneError(Exception):
    """Base class of every error asam-tune raises on purpose.

    Errors cross process boundaries (a worker's failure, a Ray or torchrun rank's exception
    shown by the driver). Pickle calls ``cls(*self.args)`` by default, which breaks for a
    subclass whose ``__init__`` takes other arguments (``RecordError``): the driver would show
    a ``TypeError`` instead of the message. So every error pickles as its class, its args and
    its attributes, and unpickles without calling ``__init__``.
    """

    def __reduce__(self):
        return _rebuilt, (type(self), self.args, dict(self.__dict__))


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
