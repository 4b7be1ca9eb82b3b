"""The profiler: times the model on every candidate device and writes a ``Profile``.

``run_profile`` (run.py) composes the parts: ``sweep`` (batch sizes on one device), the probe
processes (one per CPU thread configuration), ``transfers``, ``handover`` and ``contention``.
Importing this package imports no torch: a probe process must set its CPU affinity and thread
count before torch loads.
"""
from __future__ import annotations

__all__ = ["run_profile", "ProgressUpdate"]


def __getattr__(name: str):
    if name in __all__:
        from asam_tune.profiler import run

        return getattr(run, name)
    raise AttributeError(f"module 'asam_tune.profiler' has no attribute {name!r}")
