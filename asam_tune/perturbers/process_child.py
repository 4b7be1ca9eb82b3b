"""The CPU perturbation worker's side: boot before torch loads, then serve jobs from shared memory.

``boot`` is the process's entry point. The spawn machinery imports this module, so nothing at
its top imports torch: orphan checks, launcher variables, thread variables and core pinning
come first, and torch loads only in ``serve``.

Messages, parent -> worker (see ``process_parent.py`` for the other side):
  ("buffers", weights, perturbation, frozen, buffers)   flat shared tensors, one per dtype each
  ("inputs", leaves)                                     shared tensors, one per batch leaf
  ("spec", spec)                                         the batch structure (batches.flatten)
  ("job", step, rho, seed, rows, buffers, modes)         compute the ascent serving ``step``
  ("info",)  ("stop",)
Worker -> parent: ("ready", info) | ("start_error", type, message, traceback) once, then per
job ("done", step, finite, seconds, started_at, ended_at) | ("error", step, type, message,
traceback), and ("info", info) on request.

The replica's perturbed and frozen parameters are views of the shared buffers: the parent's
writes are what the next job reads, with no copy here. Buffers are the replica's own tensors
(its forward writes them: BatchNorm's running statistics); before a job, the ones the parent
says changed (state_sync.py) are copied into them from the shared values.
"""
from __future__ import annotations

import os
import signal
import sys
import traceback

from asam_tune import affinity

__all__ = ["boot", "serve"]


def _remote(exc: BaseException) -> tuple[str, str, str]:
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return name, " ".join(str(exc).splitlines()), traceback.format_exc()


def boot(conn, payload_box: list, cores: tuple[int, ...] | None, threads: int, parent_pid: int,
         death_signal: int) -> None:
    """Entry point of the worker process. Order matters: orphan checks, environment, cores, torch.

    ``payload_box`` holds one tuple of plain bytes (so unpickling the spawn arguments imports no
    torch), in a list so that popping it leaves no copy in the Process object's arguments.
    """
    torch_loaded_before_setup = "torch" in sys.modules
    # Ctrl-C reaches the whole process group; the parent handles it and stops this worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if death_signal:
        affinity.set_parent_death_signal(death_signal)
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(0)
    affinity.watch_parent(parent_pid)
    affinity.strip_launcher_variables(os.environ)
    affinity.set_thread_variables(os.environ, threads)
    try:
        if cores is not None:
            affinity.pin_process(cores)
    except OSError as exc:
        conn.send(("start_error", type(exc).__name__, f"cannot pin the worker to cores {list(cores)}: {exc}",
                   traceback.format_exc()))
        conn.close()
        return
    serve(conn, payload_box.pop(), cores=cores, threads=threads, torch_loaded_before_setup=torch_loaded_before_setup)
    # Stopped, or the parent is gone: everything was sent. Skip the interpreter's teardown with
    # torch loaded (about 0.5 s, which every close() waits for), as the profiler's probes do;
    # the shared segments were unlinked when made and their descriptors close with the process.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker_info(model, cores, torch_loaded_before_setup: bool) -> dict:
    import torch

    return {
        "pid": os.getpid(),
        "num_threads": torch.get_num_threads(),
        "affinity": affinity.allowed_cores(),
        "thread_affinities": affinity.thread_affinities(),
        "requested_cores": None if cores is None else sorted(cores),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "mkl_num_threads": os.environ.get("MKL_NUM_THREADS"),
        "launcher_variables": affinity.launcher_variables(os.environ),
        "parent_death_signal": affinity.parent_death_signal(),
        "torch_loaded_before_setup": torch_loaded_before_setup,
        "sharing_strategy": torch.multiprocessing.get_sharing_strategy(),
        "training": model.training,
        "modes": [m.training for m in model.modules()],
    }


def serve(conn, payload: tuple, *, cores, threads: int, torch_loaded_before_setup: bool) -> None:
    """The worker's loop, once the process is placed."""
    import pickle
    import time

    import torch
    import torch.multiprocessing  # noqa: F401 - registers torch's tensor reductions for the pipe

    from asam_tune.perturbers.ascent import ascent_perturbation, parameters_at, seeded
    from asam_tune.perturbers.batches import unflatten
    from asam_tune.perturbers.layout import FlatLayout
    from asam_tune.perturbers.state_sync import apply_modes, other_tensors
    from asam_tune.perturbers.tracing import nvtx_range

    try:
        torch.set_num_threads(threads)
        if cores is not None:
            affinity.pin_process(cores)  # any thread torch's import started
        model_bytes, loss_bytes, perturbed, adaptive, dtype_name, nvtx = payload
        ascent_dtype = None if dtype_name is None else getattr(torch, dtype_name)
        model, compute_loss = pickle.loads(model_bytes), pickle.loads(loss_bytes)
        del payload, model_bytes
        params = parameters_at(model, perturbed)
        frozen, buffers = other_tensors(model, perturbed)
        layouts = [FlatLayout(params), FlatLayout(frozen), FlatLayout(buffers)]
    except BaseException as exc:  # noqa: BLE001 - every start failure goes back to the parent
        conn.send(("start_error", *_remote(exc)))
        conn.close()
        return
    info = _worker_info(model, cores, torch_loaded_before_setup)
    info["layouts"] = [layout.signature() for layout in layouts]
    conn.send(("ready", info))

    perturbation: list[torch.Tensor] = []
    shared_buffers: list[torch.Tensor] = []
    leaves: list[torch.Tensor] = []
    spec = None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        tag = message[0]
        if tag == "stop":
            conn.close()
            return
        if tag == "buffers":
            weight_views = layouts[0].views(message[1])
            perturbation = layouts[0].views(message[2])
            frozen_views = layouts[1].views(message[3])
            shared_buffers = layouts[2].views(message[4])
            with torch.no_grad():
                for p, w in zip([*params, *frozen], [*weight_views, *frozen_views]):
                    p.data = w  # the replica reads the shared weights in place: no copy per step
        elif tag == "inputs":
            leaves = list(message[1])
        elif tag == "spec":
            spec = message[1]
        elif tag == "info":
            conn.send(("info", _worker_info(model, cores, torch_loaded_before_setup)))
        elif tag == "job":
            _, step, rho, seed, rows, changed_buffers, modes = message
            started = time.perf_counter()
            try:
                if modes is not None:
                    apply_modes(model, modes)
                with torch.no_grad():
                    for i in changed_buffers:
                        buffers[i].copy_(shared_buffers[i])
                batch = unflatten(spec, [leaf if n is None else leaf[:n] for leaf, n in zip(leaves, rows)])
                with seeded(seed), torch.enable_grad(), nvtx_range(lambda: f"asam ascent {step} (cpu worker)", nvtx):
                    e = ascent_perturbation(model, compute_loss, batch, params, rho, adaptive=adaptive,
                                             autocast_dtype=ascent_dtype)
                if e is not None:
                    torch._foreach_copy_(perturbation, e)
                ended = time.perf_counter()
                reply = ("done", step, e is not None, ended - started, started, ended)
            except Exception as exc:  # noqa: BLE001 - reported; the worker stays up
                reply = ("error", step, *_remote(exc))
            try:
                conn.send(reply)
            except OSError:
                return
