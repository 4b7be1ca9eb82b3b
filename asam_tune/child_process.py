"""What every child process of asam-tune sets up before torch loads (no torch).

The CPU perturbation worker (``perturbers/process_child.py``) and the profiler's probes
(``profiler/probe.py``) share these lists, so both strip the same launcher variables and set
the same thread variables. It lives below both stages: the profiler must not import the runtime.
"""
from __future__ import annotations

import ctypes
import sys
from collections.abc import MutableMapping

# torchrun's variables: a child that inherits them could join the job's process group.
LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)
LAUNCHER_PREFIXES = ("TORCHELASTIC_",)
# Read by the thread pools when they load (OpenMP, MKL, OpenBLAS), so set before torch is imported.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

_PR_SET_PDEATHSIG = 1
_PR_GET_PDEATHSIG = 2


def launcher_variables(environ: MutableMapping[str, str]) -> list[str]:
    """The torchrun variables present in ``environ``."""
    return sorted(k for k in environ if k in LAUNCHER_VARIABLES or k.startswith(LAUNCHER_PREFIXES))


def strip_launcher_variables(environ: MutableMapping[str, str]) -> None:
    for key in launcher_variables(environ):
        del environ[key]


def set_thread_variables(environ: MutableMapping[str, str], threads: int) -> None:
    for key in THREAD_VARIABLES:
        environ[key] = str(threads)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def set_parent_death_signal(signum: int) -> bool:
    """Ask Linux to send ``signum`` to this process when its parent thread dies (no-op elsewhere).

    Linux ties the signal to the *thread* that started the process, not to the parent process:
    a child started from a short-lived thread would get it when that thread ends.
    """
    libc = _libc()
    if libc is None:
        return False
    return libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signum), 0, 0, 0) == 0


def parent_death_signal() -> int:
    libc = _libc()
    if libc is None:
        return 0
    value = ctypes.c_int(0)
    if libc.prctl(_PR_GET_PDEATHSIG, ctypes.byref(value), 0, 0, 0) != 0:
        return 0
    return value.value
