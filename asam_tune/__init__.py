"""asam-tune: asynchronous Sharpness-Aware Minimization at SGD's cost.

Importing the package imports no torch: schedulers read plans with ``asam_tune.api``.
The torch-side types (``AsyncSAM``, ``AsyncSAMStats``, ``AdaptationSettings``) load on first use;
the ``TYPE_CHECKING`` branch lets type checkers see them without that import.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from asam_tune.errors import AsamTuneError, UserInputError, WorkerError

if TYPE_CHECKING:
    from asam_tune.runtime.adaptation import AdaptationSettings
    from asam_tune.runtime.async_sam import AsyncSAM
    from asam_tune.runtime.stats import AsyncSAMStats

__version__ = "0.1.0"

__all__ = ["AdaptationSettings", "AsamTuneError", "AsyncSAM", "AsyncSAMStats", "UserInputError", "WorkerError",
           "__version__"]

# Loaded on first use: each of these imports torch.
_LAZY = {
    "AsyncSAM": "asam_tune.runtime.async_sam",
    "AsyncSAMStats": "asam_tune.runtime.stats",
    "AdaptationSettings": "asam_tune.runtime.adaptation",
}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'asam_tune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
