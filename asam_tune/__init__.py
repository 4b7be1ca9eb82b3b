"""asam-tune: asynchronous Sharpness-Aware Minimization at SGD's cost.

Importing the package imports no torch: schedulers read plans with ``asam_tune.api``.
``AsyncSAM`` (which needs torch) is loaded on first use.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["AsyncSAM", "__version__"]


def __getattr__(name: str):
    if name == "AsyncSAM":
        from asam_tune.runtime.async_sam import AsyncSAM

        return AsyncSAM
    raise AttributeError(f"module 'asam_tune' has no attribute {name!r}")
