"""Pinning processes to cores, and watching a parent: the operating-system side of placement.

Torch-free on purpose: the CPU perturbation worker (``perturbers/process_child.py``) uses it
before torch is imported and before torch starts any thread (``torch.set_num_threads`` must
come before the first parallel op, and OpenMP reads ``OMP_NUM_THREADS`` when it loads). The
main process's placement (``runtime/placement.py``, ``runtime/distributed.py``) uses it too.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Iterable

# Shared with the profiler's probes; kept importable from here for the worker's side.
from asam_tune.child_process import (  # noqa: F401
    LAUNCHER_PREFIXES, LAUNCHER_VARIABLES, THREAD_VARIABLES, launcher_variables, parent_death_signal,
    set_parent_death_signal, set_thread_variables, strip_launcher_variables,
)

PARENT_POLL_S = 0.2  # how often the watcher looks at its parent; death is seen within this


def can_pin() -> bool:
    return hasattr(os, "sched_setaffinity")


def allowed_cores() -> list[int] | None:
    """The cores this process may run on (its affinity mask), or None where that is unknown."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return sorted(os.sched_getaffinity(0))


def _thread_ids() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no procfs: only the calling thread can be seen
        return [threading.get_native_id()]


def pin_process(cores: Iterable[int]) -> None:
    """Pin every thread of this process to ``cores``.

    ``os.sched_setaffinity(0, ...)`` binds the calling thread only; threads that already exist
    (e.g. started while the spawn machinery re-imported the parent's main module) keep their
    old mask, so each one is pinned by its id. Threads created later inherit the mask.
    """
    mask = set(cores)
    for tid in _thread_ids():
        try:
            os.sched_setaffinity(tid, mask)
        except ProcessLookupError:  # the thread ended in the meantime
            pass


def thread_affinities() -> dict[int, list[int]]:
    """Each thread's cores, for checking that a pin reached them all."""
    out = {}
    for tid in _thread_ids():
        try:
            out[tid] = sorted(os.sched_getaffinity(tid))
        except ProcessLookupError:
            pass
    return out


def watch_parent(parent_pid: int, interval_s: float = PARENT_POLL_S) -> threading.Thread:
    """Exit this process as soon as ``parent_pid`` is no longer its parent.

    A daemon thread polls ``os.getppid()``: it covers platforms without a parent-death signal,
    workers started from a non-main thread, and a main thread busy in a long job.
    ``os._exit`` because the main thread may be inside torch and cannot be interrupted.
    """

    def run() -> None:
        event = threading.Event()
        while not event.wait(interval_s):
            if os.getppid() != parent_pid:
                os._exit(0)

    thread = threading.Thread(target=run, name="asam-parent-watch", daemon=True)
    thread.start()
    return thread
