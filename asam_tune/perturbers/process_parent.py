"""The CPU perturbation worker, parent side: a spawned process fed through shared memory.

The parent (``ProcessPerturber``) and the worker (``process_child.serve``) share CPU tensors
made with ``share_memory_()``: one flat buffer per dtype for the perturbed weights, the
perturbation, the other parameters and the buffers, and one buffer per batch leaf sized for
the largest batch seen. Per step only a small tuple goes over the pipe. With torch's default
``file_descriptor`` sharing strategy every segment is unlinked from /dev/shm as soon as it is
made, so nothing survives either process; while they run, the segments count against
/dev/shm's size, which is checked before anything is allocated.

A job's exception leaves the worker running: it reports the error and waits for the next job.
A worker that died or hung is stopped for good; the perturber then raises WorkerError on use.

With the weights on a GPU, the handover stays off the main stream's path, on a copy stream of
its own (``copy_stream.CopyStreamHandover``).
"""
from __future__ import annotations

import math
import multiprocessing
import os
import pickle
import signal
import threading
import time
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.multiprocessing  # noqa: F401 - registers torch's tensor reductions: shared tensors go by fd

from asam_tune.errors import UserInputError, WorkerError
from asam_tune.perturbers import process_child
from asam_tune.perturbers.ascent import parameters_at
from asam_tune.perturbers.base import AscentJob, AscentTask, PerturbationResult, PerturberBase, check_timeout
from asam_tune.perturbers.batches import flatten
from asam_tune.perturbers.copy_stream import CopyStreamHandover
from asam_tune.perturbers.device_layer import CudaLayer, DeviceLayer
from asam_tune.perturbers.layout import FlatLayout
from asam_tune.perturbers.process_lifecycle import (KILL_GRACE_S, WorkerHandle, check_cores, cpu_replica,
                                                    main_guard_hint, payload_bytes, shutdown_worker)
from asam_tune.perturbers.shared_memory import check_shared_memory, shared_memory_error
from asam_tune.perturbers.state_sync import StateTracker, other_tensors

__all__ = ["ProcessPerturber"]

_POLL_S = 0.05  # every wait looks at the worker's liveness this often
_CPU_ONLY = {torch.device("cpu")}


def _same_spec(a: object, b: object) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - a constant leaf that compares element-wise (an array)
        return False


class ProcessPerturber(PerturberBase):
    """Computes SAM's ascent perturbation in a CPU worker process, concurrently with the caller.

    The worker owns a CPU replica of ``task.model`` (sent once; its BatchNorm statistics never
    come back), runs ``threads`` intra-op threads pinned to ``cores``, and is started with
    ``spawn``. ``submit`` copies the weights, whatever else of the model changed and the batch
    into shared memory and returns; ``collect`` returns the perturbation on the device of the
    submitted weights.

    The perturbation tensors ``collect`` returns are views into buffers this perturber owns and
    reuses: they are valid until the next ``collect``. Apply (or copy) them before that.

    Errors: a worker that cannot be started (a model or loss that cannot be pickled, too little
    /dev/shm, a start past ``start_timeout_s``), is killed, exits or hangs raises WorkerError
    (with ``pid`` and, when killed, ``signal``) and is stopped for good; an exception inside a
    job raises WorkerError with the remote type, message and ``remote_traceback`` and the
    worker stays usable. ``timeout_s`` bounds one job. Not thread-safe: one caller.
    """

    name = "perturbation worker"

    def __init__(self, task: AscentTask, *, threads: int = 1, cores: Sequence[int] | None = None,
                 timeout_s: float = 60.0, start_timeout_s: float = 60.0, layer: DeviceLayer | None = None):
        super().__init__(task, timeout_s=timeout_s)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise UserInputError(f"Invalid threads: {threads!r} (need an integer >= 1)")
        start_timeout_s = check_timeout("worker_start_timeout_s", start_timeout_s)
        self._cores = check_cores(cores)
        self._threads = threads
        model = task.model
        self._params = parameters_at(model, task.perturbed)
        frozen, buffers = other_tensors(model, task.perturbed)
        self._layouts = (FlatLayout(self._params), FlatLayout(frozen), FlatLayout(buffers))
        self._handle = WorkerHandle()
        self._finalizer = weakref.finalize(self, shutdown_worker, self._handle)
        self._leaf_buffers: list[torch.Tensor] = []
        self._spec = None
        self._main_device: torch.device | None = None
        self._gpu = CopyStreamHandover(layer if layer is not None else CudaLayer(), self._handle)
        self._outputs: dict[torch.device, list] = {}  # the perturbation's copy where no copy stream serves
        self.pid: int | None = None
        try:
            # The tracker starts from the state the replica is pickled with.
            self._tracker = StateTracker(model, task.perturbed)
            payload = (payload_bytes(cpu_replica(model), "the model"), payload_bytes(task.compute_loss, "the loss"),
                       tuple(task.perturbed), bool(task.adaptive),
                       # a name, not a torch.dtype: unpickling the spawn arguments imports no torch
                       None if task.ascent_dtype is None else str(task.ascent_dtype).removeprefix("torch."),
                       bool(task.nvtx))
            weights, perturbation, state = self._layouts
            check_shared_memory(2 * weights.nbytes + state.nbytes + perturbation.nbytes)
            self._start(payload, start_timeout_s)
        except BaseException:
            self._finalizer()
            raise

    # -- start

    def _start(self, payload: tuple, start_timeout_s: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        # Linux sends the parent-death signal when the *thread* that started the worker ends:
        # arm it only from the main thread; the worker's parent watcher covers the rest.
        on_main_thread = threading.current_thread() is threading.main_thread()
        death_signal = int(signal.SIGKILL) if on_main_thread else 0
        box = [payload]  # emptied once sent: the Process object keeps its arguments
        proc = ctx.Process(
            target=process_child.boot,
            args=(child_conn, box, self._cores, self._threads, os.getpid(), death_signal),
            name="asam-perturbation-worker",
            daemon=True,  # multiprocessing's exit hook kills it if close() never ran
        )
        self._handle.conn, self._handle.process = parent_conn, proc
        try:
            proc.start()  # in a spawned child re-running a script with no __main__ guard: RuntimeError, not caught
        except OSError as exc:
            raise WorkerError(f"cannot start the perturbation worker: {type(exc).__name__}: {exc}") from exc
        finally:
            child_conn.close()  # the worker holds the only other end: its death reads as EOF
            box.clear()
        self.pid = proc.pid

        message = self._receive(time.monotonic() + start_timeout_s, "during start",
                                hung=lambda: f"did not start within {start_timeout_s:g} s "
                                             "(worker_start_timeout_s sets the limit)")
        if message[0] == "start_error":
            _, kind, text, tb = message
            raise WorkerError(f"perturbation worker pid {self.pid} failed to start: {kind}: {text}",
                              pid=self.pid, remote_traceback=tb)
        info = message[1]
        expected = [layout.signature() for layout in self._layouts]
        if info["layouts"] != expected:
            raise WorkerError(f"perturbation worker pid {self.pid} built a replica whose parameters or buffers "
                              f"differ from the model's", pid=self.pid)
        self._start_info = info
        weights, frozen, buffers = self._layouts
        try:
            self._weights = weights.allocate(shared=True)
            self._perturbation = weights.allocate(shared=True)
            self._frozen = frozen.allocate(shared=True)
            self._buffers = buffers.allocate(shared=True)
        except RuntimeError as exc:
            raise shared_memory_error(weights.nbytes * 2 + frozen.nbytes + buffers.nbytes, exc) from exc
        self._handle.buffers.extend([*self._weights.values(), *self._perturbation.values(),
                                     *self._frozen.values(), *self._buffers.values()])
        self._weight_views = weights.views(self._weights)
        self._frozen_views = frozen.views(self._frozen)
        self._buffer_views = buffers.views(self._buffers)
        with torch.no_grad():
            for view, t in zip([*self._frozen_views, *self._buffer_views],
                               [*self._tracker.params, *self._tracker.buffers]):
                view.copy_(t.detach())
        self._send(("buffers", self._weights, self._perturbation, self._frozen, self._buffers),
                   "while receiving its buffers")

    # -- waiting, sending, failing

    def _signal_error(self, during: str) -> WorkerError:
        """The worker is gone or its pipe is: say how, with its pid and signal."""
        proc = self._handle.process
        code = None
        if proc is not None:
            proc.join(KILL_GRACE_S)  # reap it to learn how it ended
            code = proc.exitcode
        if code is None:
            return WorkerError(f"perturbation worker pid {self.pid} closed its pipe {during} but is still running",
                               pid=self.pid)
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return WorkerError(f"perturbation worker pid {self.pid} was killed by {name} (signal {-code}) {during}",
                               pid=self.pid, signal=-code)
        hint = " (its traceback, if any, is on stderr)" if code else ""
        if code == 1 and during == "during start":
            hint += main_guard_hint()
        return WorkerError(f"perturbation worker pid {self.pid} exited with code {code} {during}{hint}", pid=self.pid)

    def _fail(self, error: WorkerError) -> WorkerError:
        super()._fail(error)
        self._handle.busy = True
        self._finalizer()
        return error

    def _receive(self, deadline: float, during: str, *, hung: Callable[[], str]):
        """The worker's next message; WorkerError if it dies or ``deadline`` passes first."""
        conn, proc = self._handle.conn, self._handle.process
        while True:
            remaining = deadline - time.monotonic()
            try:
                if conn.poll(max(0.0, min(_POLL_S, remaining))):
                    return conn.recv()
            except (EOFError, OSError):
                raise self._fail(self._signal_error(during)) from None
            if not proc.is_alive():
                try:
                    if conn.poll(0):  # it answered, then exited
                        return conn.recv()
                except (EOFError, OSError):
                    pass
                raise self._fail(self._signal_error(during))
            if remaining <= 0:
                proc.kill()  # a worker that missed its deadline cannot be trusted to answer later
                raise self._fail(WorkerError(f"perturbation worker pid {self.pid} hung: {hung()}", pid=self.pid))

    def _send(self, message, during: str) -> None:
        self._wait_for_sender(during)
        try:
            self._handle.conn.send(message)
        except (OSError, ValueError):
            raise self._fail(self._signal_error(during)) from None
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise UserInputError(f"cannot send the batch to the perturbation worker: {exc}") from None

    # -- copies into and out of shared memory

    def _wait_for_sender(self, during: str) -> None:
        """Messages go one at a time: a job still on its way is sent first."""
        if not self._gpu.sender_done(self.timeout_s):
            raise self._fail(WorkerError(f"perturbation worker pid {self.pid}: the job's copies did not end "
                                         f"within {self.timeout_s:g} s {during}", pid=self.pid))

    def _write_weights(self, weights: Sequence[torch.Tensor]) -> torch.device | None:
        """Copy the weights into shared memory; returns the GPU whose copy stream still copies them, or None."""
        self._check_weights(weights)
        devices = {w.device for w in weights}
        with torch.no_grad():
            if len(devices) == 1 and self._gpu.is_accelerator(next(iter(devices))):
                device = next(iter(devices))
                self._gpu.gather_weights(device, weights, self._layouts[0], self._weights)
                return device
            if devices <= _CPU_ONLY:
                # One fused copy into the views of the flat shared buffers (no per-tensor dispatch).
                torch._foreach_copy_(self._weight_views, list(weights))
            else:  # a model spread over devices: slot by slot
                for view, w in zip(self._weight_views, weights):
                    view.copy_(w)
        return None

    def _check_weights(self, weights: Sequence[torch.Tensor]) -> None:
        # On every step's path: one list comparison when all is well (copy_ would broadcast a
        # wrong shape silently), a per-tensor search only to name the culprit.
        layout = self._layouts[0]
        if [w.shape for w in weights] == layout.sizes and [w.dtype for w in weights] == layout.dtypes:
            return
        for i, (w, shape, dtype) in enumerate(zip(weights, layout.shapes, layout.dtypes)):
            if tuple(w.shape) != shape or w.dtype != dtype:
                raise UserInputError(f"Invalid weights[{i}]: {w.dtype} {tuple(w.shape)}, expected {dtype} {shape}")

    def _write_state(self, copy_device: torch.device | None = None) -> tuple[tuple[int, ...], tuple[bool, ...] | None]:
        """Copy what of the model changed besides the weights; the buffers the worker must take, new modes.

        Tensors on ``copy_device`` go by its copy stream, like the weights.
        """
        changes = self._tracker.changes()
        pairs = ([(self._frozen_views[i], self._tracker.params[i]) for i in changes.params]
                 + [(self._buffer_views[i], self._tracker.buffers[i]) for i in changes.buffers])
        if copy_device is not None and pairs:
            for flat in (*self._frozen.values(), *self._buffers.values()):
                self._gpu.pin(flat)
        with torch.no_grad():
            for dst, src in pairs:
                if copy_device is not None and src.device == copy_device:
                    self._gpu.copy_to_host(dst, src.detach(), copy_device)
                else:
                    dst.copy_(src.detach())
        return changes.buffers, changes.modes

    def _write_batch(self, batch, copy_device: torch.device | None = None) -> list[int | None]:
        """The batch into its shared buffers; leaves on ``copy_device`` go by its copy stream."""
        leaves, spec = flatten(batch)
        if not any(leaf.dim() >= 1 and leaf.shape[0] > 0 for leaf in leaves):
            raise UserInputError(f"Invalid batch: {type(batch).__name__} has no tensor with at least one row")

        def fits(buf: torch.Tensor, t: torch.Tensor) -> bool:
            return (buf.dtype == t.dtype and buf.shape[1:] == t.shape[1:] and buf.dim() == t.dim()
                    and (t.dim() == 0 or buf.shape[0] >= t.shape[0]))

        old = self._leaf_buffers
        if len(old) != len(leaves) or not all(fits(b, t) for b, t in zip(old, leaves)):
            grown = []
            for i, t in enumerate(leaves):
                if i < len(old) and fits(old[i], t):
                    grown.append(old[i])
                    continue
                rows = t.shape[0] if t.dim() else 0
                if i < len(old) and old[i].dtype == t.dtype and old[i].shape[1:] == t.shape[1:] and t.dim():
                    rows = max(rows, old[i].shape[0])
                shape = (rows, *t.shape[1:]) if t.dim() else ()
                nbytes = t.element_size() * math.prod(shape)
                check_shared_memory(nbytes)
                try:
                    grown.append(torch.empty(shape, dtype=t.dtype).share_memory_())
                except RuntimeError as exc:
                    raise shared_memory_error(nbytes, exc) from exc
            # The old buffers are freed once the worker has swapped to the new ones.
            self._leaf_buffers = grown
            self._send(("inputs", grown), "while receiving new input buffers")
        if not _same_spec(spec, self._spec):
            self._send(("spec", spec), "while receiving the batch structure")
            self._spec = spec
        rows: list[int | None] = []
        with torch.no_grad():
            for buf, t in zip(self._leaf_buffers, leaves):
                target = buf if t.dim() == 0 else buf[: t.shape[0]]
                rows.append(None if t.dim() == 0 else int(t.shape[0]))
                if copy_device is not None and t.device == copy_device:
                    self._gpu.pin(buf)
                    self._gpu.copy_to_host(target, t, copy_device, keep_alive=True)
                else:
                    target.copy_(t)
        return rows

    def _read_perturbation(self) -> list[torch.Tensor]:
        device = self._main_device
        if self._gpu.is_accelerator(device):
            return self._gpu.read_up(device, self._layouts[0], self._perturbation)
        outputs = self._outputs.get(device)
        if outputs is None:
            flats = self._layouts[0].allocate(device)
            self._outputs[device] = outputs = [flats, self._layouts[0].views(flats)]
        flats, views = outputs
        for dtype, src in self._perturbation.items():
            flats[dtype].copy_(src)
        return views

    # -- the Perturber protocol

    def submit(self, job: AscentJob) -> None:
        """Copy the weights, what else changed and the batch into shared memory; start the job."""
        self._begin(job)
        self._wait_for_sender(f"before step {job.step}")
        copy_device = self._write_weights(job.weights)
        buffers, modes = self._write_state(copy_device)
        rows = self._write_batch(job.batch, copy_device)
        self._main_device = job.weights[0].device if len(job.weights) else torch.device("cpu")
        message = ("job", job.step, float(job.rho), int(job.seed), rows, buffers, modes)
        if copy_device is None:
            self._send(message, f"when sent step {job.step}")
        else:
            self._gpu.send_when_copied(message, copy_device)
        self._started(job.step)
        self._handle.busy = True

    def ready(self) -> bool:
        """True when ``collect`` would not wait (a result is there, or the worker is gone)."""
        if self._pending is None or self._closed:
            return False
        if self._broken is not None:
            return True
        try:
            return self._handle.conn.poll(0) or not self._handle.process.is_alive()
        except (EOFError, OSError):
            return True

    def collect(self, timeout: float | None = None) -> PerturbationResult:
        """The pending job's result; waits at most ``timeout`` s (None: the job's ``timeout_s``).

        A job that has not answered by then, or ``timeout_s`` after submit, counts as hung: the
        worker is killed and WorkerError raised. To wait without that risk, poll ``ready()``.
        """
        step = self._take_pending()
        deadline = self._deadline(timeout)
        message = self._receive(deadline, f"while computing step {step}",
                                hung=lambda: f"no result for step {step} after {self._waited():.1f} s "
                                             "(worker_timeout_s sets the limit)")
        self._pending = None
        self._handle.busy = False
        if message[0] == "error":
            _, _, kind, text, tb = message
            raise WorkerError(f"perturbation worker pid {self.pid} raised {kind}: {text} (step {step})",
                              pid=self.pid, remote_traceback=tb)
        _, done_step, finite, seconds, started_at, ended_at = message
        if done_step != step:
            raise self._fail(WorkerError(f"perturbation worker pid {self.pid} answered step {done_step}, "
                                         f"expected {step}", pid=self.pid))
        return PerturbationResult(step, self._read_perturbation() if finite else None, seconds,
                                  started_at, ended_at)

    def worker_info(self, timeout: float = 10.0) -> dict:
        """What the worker sees of itself: pid, threads, cores per thread, environment, modes."""
        self._check_usable()
        if self._pending is not None:
            raise RuntimeError("worker_info() while a job is pending; collect() first")
        self._send(("info",), "when asked for its info")
        message = self._receive(time.monotonic() + timeout, "when asked for its info",
                                hung=lambda: f"no info after {timeout:g} s")
        return message[1]

    def close(self) -> None:
        """Stop the worker (in order, then by force) and free the shared buffers; idempotent."""
        self._closed = True
        self._pending = None
        self._finalizer()
        self._leaf_buffers = []
        self._weights = self._perturbation = self._frozen = self._buffers = {}
        self._weight_views = self._frozen_views = self._buffer_views = []
        self._gpu.close()
        self._outputs.clear()
