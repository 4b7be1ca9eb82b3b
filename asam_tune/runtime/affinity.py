"""Placing a worker process before torch loads: cores, threads, launcher variables, parent death.

Torch-free on purpose. ``boot_worker`` is the entry point of the CPU perturbation worker
process: the spawn machinery imports this module, so everything here runs before torch is
imported and before it starts any thread (``torch.set_num_threads`` must come before the first
parallel op, and OpenMP reads ``OMP_NUM_THREADS`` when it loads).
"""
from __future__ import annotations

import os
import signal
import sys
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


def boot_worker(conn, payload_box: list, cores: tuple[int, ...] | None, threads: int,
                parent_pid: int, death_signal: int) -> None:
    """Entry point of the CPU perturbation worker (see ``process_worker``).

    ``payload_box`` holds one tuple: the pickled replica, the pickled loss function and rho.
    Plain bytes, so that unpickling the spawn arguments imports no torch; in a list, so that
    popping it leaves no copy in the Process object's arguments once the model is built.

    Order matters: orphan checks, environment, affinity, and only then torch.
    """
    torch_loaded_before_setup = "torch" in sys.modules
    # Ctrl-C reaches the whole process group; the parent handles it and stops this worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if death_signal:
        set_parent_death_signal(death_signal)
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(0)
    watch_parent(parent_pid)
    strip_launcher_variables(os.environ)
    set_thread_variables(os.environ, threads)
    try:
        if cores is not None:
            pin_process(cores)
    except OSError as exc:
        # Reported as a start failure by the parent; torch is not needed to say so.
        import traceback

        conn.send(("start_error", type(exc).__name__, f"cannot pin the worker to cores {list(cores)}: {exc}",
                   traceback.format_exc()))
        conn.close()
        return
    from asam_tune.runtime import process_worker  # imports torch, now that the process is placed

    process_worker.serve(conn, payload_box.pop(), cores=cores, threads=threads,
                         torch_loaded_before_setup=torch_loaded_before_setup)
