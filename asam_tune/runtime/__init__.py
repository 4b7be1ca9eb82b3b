"""The training-time stage: ``AsyncSAM``, which drives a perturber (``asam_tune.perturbers``).

Modules: ``async_sam`` (the class), ``options`` (plan and arguments), ``schedule`` (which
result serves which step), ``traffic`` (jobs handed over and collected, timed), ``lookahead``
(the loader read one step ahead), ``failures`` (fallback), ``workers`` (which perturber),
``adaptation`` and ``adaptation_feed`` (online ``b_p``), ``checkpoint``, ``hooks``, ``stats``,
``distributed`` (several ranks), ``placement`` (the main process's cores).
``AsyncSAM`` is loaded on first use.
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
