"""The CPU worker process's life outside a job: its payload, its start and stop, and its pinned memory.

``ProcessPerturber`` (``process_parent.py``) runs the jobs; what it needs to ship the model to
a spawned process, to stop that process in order (also from ``weakref.finalize`` at exit), and
to page-lock the shared buffers for the GPU lives here.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
import warnings
from dataclasses import dataclass, field

import torch

from asam_tune import affinity
from asam_tune.errors import UserInputError, WorkerError
from asam_tune.perturbers.replica import replica_on

__all__ = ["KILL_GRACE_S", "STOP_GRACE_S", "WorkerHandle", "check_cores", "cpu_replica", "main_guard_hint", "payload_bytes", "register_host",
           "shutdown_worker"]

STOP_GRACE_S = 5.0  # an idle worker answers "stop" well within this
KILL_GRACE_S = 2.0


def payload_bytes(obj: object, what: str) -> bytes:
    """Pickle for the worker: by value where plain pickle cannot (a lambda, a class in ``__main__``)."""
    try:
        import cloudpickle
    except ImportError:  # cloudpickle is a dependency; keep working without it all the same
        cloudpickle = None
    try:
        if cloudpickle is not None:
            return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001
        raise WorkerError(f"cannot send {what} to the perturbation worker: {type(exc).__name__}: {exc}") from exc


def cpu_replica(model: torch.nn.Module) -> torch.nn.Module:
    try:
        return replica_on(model, "cpu")
    except Exception as exc:  # noqa: BLE001 - deepcopy fails where pickling would
        raise WorkerError(f"cannot send the model to the perturbation worker: it cannot be copied: "
                          f"{type(exc).__name__}: {exc}") from exc


@dataclass
class WorkerHandle:
    """What shutting the worker down needs; kept apart from the perturber for weakref.finalize."""

    process: multiprocessing.process.BaseProcess | None = None
    conn: object | None = None
    # Buffers registered with CUDA live here until unregistered, even while the perturber is
    # being garbage-collected.
    buffers: list[torch.Tensor] = field(default_factory=list)
    registered: list[int] = field(default_factory=list)
    busy: bool = False  # in a job or in an unknown state: it will not read "stop" soon
    pin_warned: bool = False  # a failed cudaHostRegister has been reported
    cudart: object | None = None  # what registered the buffers: it unregisters them


def shutdown_worker(handle: WorkerHandle) -> None:
    """Stop the worker in order, then by force; free every buffer. Safe at exit and after death."""
    proc, conn = handle.process, handle.conn
    if proc is not None:
        try:
            if proc.is_alive() and not handle.busy:
                conn.send(("stop",))
                proc.join(STOP_GRACE_S)
            if proc.is_alive():
                proc.terminate()
                proc.join(KILL_GRACE_S)
            if proc.is_alive():
                proc.kill()
                proc.join(KILL_GRACE_S)
        except (OSError, ValueError, AttributeError):
            # Broken pipe, or interpreter teardown; kill whatever is left.
            try:
                proc.kill()
                proc.join(KILL_GRACE_S)
            except (OSError, ValueError, AttributeError):
                pass
        if proc.exitcode is not None:
            proc.close()
    if conn is not None:
        try:
            conn.close()
        except OSError:
            pass
    for ptr in handle.registered:
        try:
            (handle.cudart or torch.cuda.cudart()).cudaHostUnregister(ptr)
        except Exception:  # noqa: BLE001 - CUDA may already be torn down at exit
            pass
    handle.process = handle.conn = None
    handle.registered.clear()
    handle.buffers.clear()


def register_host(handle: WorkerHandle, t: torch.Tensor, cudart=None) -> bool:
    """Page-lock a shared buffer so that copies to and from the GPU are asynchronous DMA.

    A failed registration leaves CUDA's last-error state set, which the next kernel launch
    would report as its own failure: it is read (and so cleared) here, and the copies stay
    pageable (correct, only blocking on the host). The first failure of a worker warns once.
    ``cudart`` is ``torch.cuda.cudart()`` unless given (tests pass a fake).
    """
    if t.numel() == 0:
        return False
    if cudart is None:
        cudart = torch.cuda.cudart()
    code: object = None
    try:
        flags = 1  # cudaHostRegisterPortable: pinned for every CUDA context of this process
        code = cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), flags)
        ok = int(code) == 0
    except Exception as exc:  # noqa: BLE001
        code, ok = f"{type(exc).__name__}: {exc}", False
    if not ok:
        try:
            cudart.cudaGetLastError()
        except Exception:  # noqa: BLE001 - nothing more to clear
            pass
        if not handle.pin_warned:
            handle.pin_warned = True
            warnings.warn(f"asam-tune: cudaHostRegister of the CPU worker's shared buffers failed ({code}); "
                          "copies to and from the GPU stay pageable (correct, slower, blocking the host)",
                          RuntimeWarning, stacklevel=2)
        return False
    handle.registered.append(t.data_ptr())
    return True


def check_cores(cores) -> tuple[int, ...] | None:
    if cores is None:
        return None
    if not affinity.can_pin():
        raise UserInputError(f"Invalid cores: {cores!r} (this platform cannot pin processes)")
    out = tuple(cores)
    count = os.cpu_count() or 0
    if (not out or len(set(out)) != len(out)
            or any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < count for c in out)):
        raise UserInputError(f"Invalid cores: {cores!r} (need distinct core numbers in 0..{count - 1})")
    return out


def main_guard_hint() -> str:
    main = sys.modules.get("__main__")
    if getattr(main, "__file__", None) and getattr(main, "__spec__", None) is None:
        return (f"; if {os.path.basename(main.__file__)} starts training at its top level, put that code under "
                "`if __name__ == \"__main__\":` (the worker is started with spawn, which re-imports the script)")
    return ""
