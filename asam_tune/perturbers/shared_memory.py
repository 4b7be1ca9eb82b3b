"""Room in /dev/shm for the CPU worker's shared buffers, checked before anything is allocated.

Shared tensors live in /dev/shm (a tmpfs) while both processes run. Docker gives containers
64 MB there by default; a ResNet-18 worker needs about twice its 47 MB of weights. Running out
surfaces from torch as an obscure ``RuntimeError`` halfway through; checked here first, it is
a ``WorkerError`` that names the shortage and the fix, and ``AsyncSAM`` falls back on it.
"""
from __future__ import annotations

import os

from asam_tune.errors import WorkerError

__all__ = ["SHM_PATH", "check_shared_memory", "free_shared_memory", "shared_memory_error"]

SHM_PATH = "/dev/shm"
# Room left for the segments' page rounding and for whatever else is using /dev/shm.
_HEADROOM_BYTES = 1 << 20


def free_shared_memory(path: str = SHM_PATH) -> int | None:
    """Bytes free in ``path``, or None where it cannot be told (no /dev/shm: not Linux)."""
    try:
        stats = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return stats.f_bavail * stats.f_frsize


def _message(needed: int, free: int | None) -> str:
    have = "" if free is None else f", {free / 2**20:.1f} MB free"
    return (f"not enough shared memory for the perturbation worker: it needs {needed / 2**20:.1f} MB in "
            f"{SHM_PATH}{have}; give the container more (Docker: --shm-size=1g, Kubernetes: an emptyDir "
            "with medium: Memory mounted at /dev/shm) or use perturbation_device=None")


def check_shared_memory(needed: int, path: str = SHM_PATH) -> None:
    """Raise WorkerError when ``path`` has less than ``needed`` bytes (plus headroom) free."""
    free = free_shared_memory(path)
    if free is not None and free < needed + _HEADROOM_BYTES:
        raise WorkerError(_message(needed, free))


def shared_memory_error(needed: int, cause: BaseException) -> WorkerError:
    """The WorkerError for an allocation that failed all the same (another process took the room)."""
    return WorkerError(f"{_message(needed, free_shared_memory())} ({type(cause).__name__}: {cause})")
