"""NVTX ranges (``torch.cuda.nvtx``) around the main step, the handover and each ascent job.

On by an option (``AsyncSAM(nvtx=True)``), so that an ``nsys`` timeline shows the ascent
beside the main step. Where CUDA is absent (a CPU build, no driver) a range does nothing:
``torch.cuda.nvtx`` would raise there. Ranges are per thread, as NVTX's are: a worker thread's
ascent is its own range.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["nvtx_end", "nvtx_range", "nvtx_start", "set_nvtx"]

_override: Any = None  # a stand-in with range_push/range_pop (tests)


def set_nvtx(module: Any) -> Any:
    """Use ``module`` (anything with ``range_push(str)`` and ``range_pop()``) for NVTX; returns the previous one.

    None restores ``torch.cuda.nvtx`` (when CUDA is available).
    """
    global _override
    before, _override = _override, module
    return before


def _nvtx() -> Any:
    if _override is not None:
        return _override
    return torch.cuda.nvtx if torch.cuda.is_available() else None


@contextlib.contextmanager
def nvtx_range(name: str | Callable[[], str], enabled: bool = True) -> Iterator[None]:
    """An NVTX range named ``name`` around the block when ``enabled`` and NVTX can record; else nothing."""
    nvtx = _nvtx() if enabled else None
    if nvtx is None:
        yield
        return
    nvtx.range_push(name() if callable(name) else name)
    try:
        yield
    finally:
        nvtx.range_pop()


def nvtx_start(name: str, enabled: bool = True) -> Any:
    """Open a range that may end on any thread, in any nesting (``range_start``); returns its handle or None."""
    nvtx = _nvtx() if enabled else None
    if nvtx is None:
        return None
    return (nvtx, nvtx.range_start(name))


def nvtx_end(handle: Any) -> None:
    """Close a range ``nvtx_start`` opened (None: nothing)."""
    if handle is not None:
        nvtx, ident = handle
        nvtx.range_end(ident)
