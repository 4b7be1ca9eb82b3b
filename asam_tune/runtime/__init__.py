"""The training-time stage: ``AsyncSAM`` and the perturbation workers behind it.

``AsyncSAM`` is loaded on first use so that a worker process importing
``asam_tune.runtime.process_worker`` does not pay for the whole runtime.
"""
from __future__ import annotations

__all__ = ["AsyncSAM", "AsyncSAMStats", "main_process_placement"]


def __getattr__(name: str):
    if name == "AsyncSAM":
        from asam_tune.runtime.async_sam import AsyncSAM

        return AsyncSAM
    if name == "AsyncSAMStats":
        from asam_tune.runtime.stats import AsyncSAMStats

        return AsyncSAMStats
    if name == "main_process_placement":
        from asam_tune.runtime.placement import main_process_placement

        return main_process_placement
    raise AttributeError(f"module 'asam_tune.runtime' has no attribute {name!r}")
