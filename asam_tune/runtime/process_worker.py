"""The CPU perturbation worker: a spawned process with its own replica, fed through shared memory.

The parent (``ProcessPerturber``) and the worker (``serve``) share CPU tensors made with
``share_memory_()``: one flat buffer per dtype for the weights and for the perturbation, and
input/label buffers sized for the largest batch seen. Per step only a small tuple goes over a
pipe. With torch's default ``file_descriptor`` sharing strategy every shared segment is
unlinked from /dev/shm as soon as it is made, so nothing survives either process.

Messages, parent -> worker: ("buffers", weights, perturbation), ("inputs", x, y),
("job", step, x_rows, y_rows), ("info",), ("stop",).
Worker -> parent: ("ready", info) | ("start_error", type, message, traceback) once, then per
job ("done", step, finite, seconds) | ("error", step, type, message, traceback), and
("info", info) on request.

A job's exception leaves the worker running: it reports the error and waits for the next job
(the replica's weights are rewritten by every submit, so a failed job leaves nothing behind).
A worker that died or hung is stopped for good; the perturber then raises WorkerError on use.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import pickle
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.multiprocessing  # registers torch's tensor reductions: shared tensors go by fd
from torch import nn

from asam_tune.errors import UserInputError, WorkerError
from asam_tune.runtime import affinity
from asam_tune.runtime.perturbation import ascent_perturbation, trainable_parameters
from asam_tune.runtime.perturber import PerturbationResult, job_deadline
from asam_tune.runtime.replica import replica_on

_POLL_S = 0.05  # every wait looks at the worker's liveness this often
_STOP_GRACE_S = 5.0  # an idle worker answers "stop" well within this
_KILL_GRACE_S = 2.0
_CPU_ONLY = {torch.device("cpu")}


# ----------------------------------------------------------------------------- flat layout


class FlatLayout:
    """Where each trainable parameter lives in one flat buffer per dtype.

    Built from the parameters in ``trainable_parameters`` order, identically on both sides.
    """

    def __init__(self, params: Sequence[torch.Tensor]):
        self.shapes = [tuple(p.shape) for p in params]
        self.sizes = [torch.Size(s) for s in self.shapes]  # compares with w.shape without a tuple() each
        self.dtypes = [p.dtype for p in params]
        self.totals: dict[torch.dtype, int] = {}
        self.offsets: list[int] = []
        for p in params:
            start = self.totals.get(p.dtype, 0)
            self.offsets.append(start)
            self.totals[p.dtype] = start + p.numel()

    def __len__(self) -> int:
        return len(self.shapes)

    def signature(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(str(d), s) for d, s in zip(self.dtypes, self.shapes)]

    def allocate(self, device: torch.device | str = "cpu", *, shared: bool = False) -> dict[torch.dtype, torch.Tensor]:
        flats = {d: torch.zeros(n, dtype=d, device=device) for d, n in self.totals.items()}
        if shared:
            for t in flats.values():
                t.share_memory_()
        return flats

    def views(self, flats: dict[torch.dtype, torch.Tensor]) -> list[torch.Tensor]:
        return [
            flats[d][o:o + math.prod(s)].view(s)
            for d, o, s in zip(self.dtypes, self.offsets, self.shapes)
        ]

    def groups(self, tensors: Sequence[torch.Tensor]) -> dict[torch.dtype, list[torch.Tensor]]:
        """``tensors`` (one per parameter) split by their parameter's dtype, in flat order."""
        out: dict[torch.dtype, list[torch.Tensor]] = {d: [] for d in self.totals}
        for d, t in zip(self.dtypes, tensors):
            out[d].append(t)
        return out


def _remote(exc: BaseException) -> tuple[str, str, str]:
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return name, " ".join(str(exc).splitlines()), traceback.format_exc()


# ----------------------------------------------------------------------------- worker side


def _worker_info(model: nn.Module, cores, torch_loaded_before_setup: bool) -> dict:
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
    }


def serve(conn, payload: tuple[bytes, bytes, float], *, cores, threads: int, torch_loaded_before_setup: bool) -> None:
    """The worker's loop; called by ``affinity.boot_worker`` once the process is placed."""
    try:
        torch.set_num_threads(threads)
        if cores is not None:
            affinity.pin_process(cores)  # any thread torch's import started
        model_bytes, loss_bytes, rho = payload
        model, loss_fn = pickle.loads(model_bytes), pickle.loads(loss_bytes)
        del payload, model_bytes
        model.train()
        params = trainable_parameters(model)
        layout = FlatLayout(params)
    except BaseException as exc:  # noqa: BLE001 - every start failure goes back to the parent
        conn.send(("start_error", *_remote(exc)))
        conn.close()
        return
    info = _worker_info(model, cores, torch_loaded_before_setup)
    info["layout"] = layout.signature()
    conn.send(("ready", info))

    perturbation: list[torch.Tensor] = []
    x_buf = y_buf = None
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
            weights, pert = layout.views(message[1]), layout.views(message[2])
            with torch.no_grad():
                for p, w in zip(params, weights):
                    p.data = w  # the replica reads the shared weights in place: no copy per step
            perturbation = pert
        elif tag == "inputs":
            x_buf, y_buf = message[1], message[2]
        elif tag == "info":
            conn.send(("info", _worker_info(model, cores, torch_loaded_before_setup)))
        elif tag == "job":
            _, step, x_rows, y_rows = message
            started = time.perf_counter()
            try:
                with torch.enable_grad():
                    e = ascent_perturbation(model, loss_fn, x_buf[:x_rows], y_buf[:y_rows], rho)
                if e is not None:
                    with torch.no_grad():
                        for dst, src in zip(perturbation, e):
                            dst.copy_(src)
                reply = ("done", step, e is not None, time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001 - reported; the worker stays up
                reply = ("error", step, *_remote(exc))
            try:
                conn.send(reply)
            except OSError:
                return


# ----------------------------------------------------------------------------- parent side


@dataclass
class _WorkerHandle:
    """What shutting the worker down needs; kept apart from the perturber for weakref.finalize."""

    process: multiprocessing.process.BaseProcess | None = None
    conn: object | None = None
    # Buffers registered with CUDA live here until unregistered, even while the perturber is
    # being garbage-collected.
    buffers: list[torch.Tensor] = field(default_factory=list)
    registered: list[int] = field(default_factory=list)
    busy: bool = False  # in a job or in an unknown state: it will not read "stop" soon


def _shutdown(handle: _WorkerHandle) -> None:
    """Stop the worker in order, then by force; free every buffer. Safe at exit and after death."""
    proc, conn = handle.process, handle.conn
    if proc is not None:
        try:
            if proc.is_alive() and not handle.busy:
                conn.send(("stop",))
                proc.join(_STOP_GRACE_S)
            if proc.is_alive():
                proc.terminate()
                proc.join(_KILL_GRACE_S)
            if proc.is_alive():
                proc.kill()
                proc.join(_KILL_GRACE_S)
        except (OSError, ValueError, AttributeError):
            # Broken pipe, or interpreter teardown; kill whatever is left.
            try:
                proc.kill()
                proc.join(_KILL_GRACE_S)
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
            torch.cuda.cudart().cudaHostUnregister(ptr)
        except Exception:  # noqa: BLE001 - CUDA may already be torn down at exit
            pass
    handle.process = handle.conn = None
    handle.registered.clear()
    handle.buffers.clear()


def _register_host(handle: _WorkerHandle, t: torch.Tensor) -> bool:
    """Page-lock a shared buffer so that copies to and from the GPU are asynchronous DMA."""
    if t.numel() == 0:
        return False
    try:
        flags = 1  # cudaHostRegisterPortable: pinned for every CUDA context of this process
        ok = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), flags)) == 0
    except Exception:  # noqa: BLE001 - not pinned: the copies stay correct, only blocking
        return False
    if ok:
        handle.registered.append(t.data_ptr())
    return ok


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserInputError(f"Invalid {name}: {value!r} (need a positive number of seconds)")


def _check_cores(cores) -> tuple[int, ...] | None:
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


class ProcessPerturber:
    """Computes SAM's ascent perturbation in a CPU worker process, concurrently with the caller.

    The worker owns a CPU replica of ``model`` (sent once; its BatchNorm statistics never come
    back), runs ``threads`` intra-op threads pinned to ``cores``, and is started with ``spawn``.
    ``submit`` copies the weights and the batch into shared memory and returns; ``collect``
    returns the perturbation on the device of the submitted weights.

    The perturbation tensors ``collect`` returns are views into buffers this perturber owns and
    reuses: they are valid until the next ``collect``. Apply (or copy) them before that.

    Errors: a worker that is killed, exits or hangs raises WorkerError (with ``pid`` and, when
    killed, ``signal``) and is stopped for good; an exception inside a job raises WorkerError
    with the remote type, message and ``remote_traceback`` and the worker stays usable.
    ``timeout_s`` bounds one job; ``start_timeout_s`` the start. Not thread-safe: one caller.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        rho: float,
        *,
        threads: int = 1,
        cores: Sequence[int] | None = None,
        timeout_s: float = 60.0,
        start_timeout_s: float = 60.0,
    ):
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 0:
            raise UserInputError(f"Invalid rho: {rho!r}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise UserInputError(f"Invalid threads: {threads!r} (need an integer >= 1)")
        _check_positive("timeout_s", timeout_s)
        _check_positive("start_timeout_s", start_timeout_s)
        self._cores = _check_cores(cores)
        self._threads = threads
        self._timeout_s = float(timeout_s)
        self._layout = FlatLayout(trainable_parameters(model))
        self._handle = _WorkerHandle()
        self._finalizer = weakref.finalize(self, _shutdown, self._handle)
        self._closed = False
        self._broken: WorkerError | None = None
        self._pending: int | None = None
        self._submitted_at = 0.0
        self._x_buf = self._y_buf = None
        self._main_device: torch.device | None = None
        self._perturbation_read: torch.cuda.Event | None = None  # the last H2D copy of a result
        self._staging: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._outputs: dict[torch.device, list[torch.Tensor]] = {}
        self._pinned: set[int] = set()
        self.pid: int | None = None

        payload = self._payload(model, loss_fn, rho)
        try:
            self._start(payload, float(start_timeout_s))
        except BaseException:
            self._finalizer()
            raise

    # -- start

    @staticmethod
    def _payload(model: nn.Module, loss_fn: Callable, rho: float) -> tuple[bytes, bytes, float]:
        # Pickled here, unpickled by the worker only after it has set its threads and cores:
        # unpickling the spawn arguments (plain bytes) must not import torch.
        try:
            model_bytes = pickle.dumps(replica_on(model, "cpu"), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001
            raise WorkerError(f"cannot send the model to the perturbation worker: "
                              f"{type(exc).__name__}: {exc}") from exc
        try:
            loss_bytes = pickle.dumps(loss_fn, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001
            raise WorkerError(f"cannot send loss_fn {loss_fn!r} to the perturbation worker: "
                              f"{type(exc).__name__}: {exc}") from exc
        return model_bytes, loss_bytes, float(rho)

    def _start(self, payload: tuple[bytes, bytes, float], start_timeout_s: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        # Linux sends the parent-death signal when the *thread* that started the worker ends:
        # arm it only from the main thread; the worker's parent watcher covers the rest.
        on_main_thread = threading.current_thread() is threading.main_thread()
        death_signal = int(signal.SIGKILL) if on_main_thread else 0
        box = [payload]  # emptied once sent: the Process object keeps its arguments
        proc = ctx.Process(
            target=affinity.boot_worker,
            args=(child_conn, box, self._cores, self._threads, os.getpid(), death_signal),
            name="asam-perturbation-worker",
            daemon=True,  # multiprocessing's exit hook kills it if close() never ran
        )
        self._handle.conn, self._handle.process = parent_conn, proc
        try:
            proc.start()
        except OSError as exc:
            raise WorkerError(f"cannot start the perturbation worker: {type(exc).__name__}: {exc}") from exc
        finally:
            child_conn.close()  # the worker holds the only other end: its death reads as EOF
            box.clear()
        self.pid = proc.pid

        message = self._receive(time.monotonic() + start_timeout_s, "during start",
                                hung=lambda: f"did not start within {start_timeout_s:g} s")
        if message[0] == "start_error":
            _, kind, text, tb = message
            raise WorkerError(f"perturbation worker pid {self.pid} failed to start: {kind}: {text}",
                              pid=self.pid, remote_traceback=tb)
        info = message[1]
        if info["layout"] != self._layout.signature():
            raise WorkerError(f"perturbation worker pid {self.pid} built a replica whose trainable "
                              f"parameters differ from the model's: {info['layout']!r}", pid=self.pid)
        self._start_info = info
        self._weights = self._layout.allocate(shared=True)
        self._perturbation = self._layout.allocate(shared=True)
        self._handle.buffers.extend([*self._weights.values(), *self._perturbation.values()])
        self._weight_views = self._layout.views(self._weights)
        self._send(("buffers", self._weights, self._perturbation), "while receiving its buffers")

    # -- waiting, sending, failing

    def _signal_error(self, during: str) -> WorkerError:
        """The worker is gone or its pipe is: say how, with its pid and signal."""
        proc = self._handle.process
        code = None
        if proc is not None:
            proc.join(_KILL_GRACE_S)  # reap it to learn how it ended
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
        return WorkerError(f"perturbation worker pid {self.pid} exited with code {code} {during}{hint}", pid=self.pid)

    def _fail(self, error: WorkerError) -> WorkerError:
        """Stop the worker for good and remember why; returns ``error`` for raising."""
        self._broken = error
        self._pending = None
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
        try:
            self._handle.conn.send(message)
        except (OSError, ValueError):
            raise self._fail(self._signal_error(during)) from None

    def _check_usable(self) -> None:
        if self._broken is not None:
            b = self._broken
            raise WorkerError(f"the perturbation worker is no longer usable: {b}", pid=b.pid, signal=b.signal,
                              remote_traceback=b.remote_traceback)
        if self._closed:
            raise RuntimeError("ProcessPerturber is closed")

    # -- copies into and out of shared memory

    def _pin(self, t: torch.Tensor) -> bool:
        key = t.data_ptr()
        if key not in self._pinned and _register_host(self._handle, t):
            self._pinned.add(key)
        return key in self._pinned

    def _write_weights(self, weights: Sequence[torch.Tensor]) -> None:
        self._check_weights(weights)
        devices = {w.device for w in weights}
        waits = []
        with torch.no_grad():
            if len(devices) == 1 and next(iter(devices)).type == "cuda":
                device = next(iter(devices))
                for dtype, group in self._layout.groups(weights).items():
                    # One gather on the GPU, one DMA into the page-locked shared buffer.
                    staging = self._staging.get((device, dtype))
                    if staging is None:
                        staging = self._staging[(device, dtype)] = torch.empty(
                            self._layout.totals[dtype], dtype=dtype, device=device)
                    torch.cat([w.reshape(-1) for w in group], out=staging)
                    shared = self._weights[dtype]
                    shared.copy_(staging, non_blocking=self._pin(shared))
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
                waits.append(event)
            elif devices == _CPU_ONLY:
                # One fused copy into the views of the flat shared buffers (no per-tensor dispatch).
                torch._foreach_copy_(self._weight_views, list(weights))
            else:  # a model spread over devices: slot by slot
                for view, w in zip(self._weight_views, weights):
                    view.copy_(w)
        for event in waits:
            event.synchronize()  # the worker reads the buffer as soon as the job message lands

    def _check_weights(self, weights: Sequence[torch.Tensor]) -> None:
        # On every step's path: one list comparison when all is well (copy_ would broadcast a
        # wrong shape silently), a per-tensor search only to name the culprit.
        if len(weights) != len(self._layout):
            raise UserInputError(f"Invalid weights: got {len(weights)} tensors, the model has "
                                 f"{len(self._layout)} trainable parameters")
        if [w.shape for w in weights] == self._layout.sizes and [w.dtype for w in weights] == self._layout.dtypes:
            return
        for i, (w, shape, dtype) in enumerate(zip(weights, self._layout.shapes, self._layout.dtypes)):
            if tuple(w.shape) != shape or w.dtype != dtype:
                raise UserInputError(f"Invalid weights[{i}]: {w.dtype} {tuple(w.shape)}, expected {dtype} {shape}")

    def _write_inputs(self, x: torch.Tensor, y: torch.Tensor) -> None:
        for name, t in (("x", x), ("y", y)):
            if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] == 0:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise UserInputError(f"Invalid {name}: {shape} (need a tensor with at least one row)")
        if x.shape[0] != y.shape[0]:
            # One label per input row: caught here, not as a failed job in the worker.
            raise UserInputError(f"Invalid batch: x {tuple(x.shape)} and y {tuple(y.shape)} differ in rows "
                                 f"({x.shape[0]} != {y.shape[0]})")

        def fits(buf, t):
            return (buf is not None and buf.dtype == t.dtype and buf.shape[1:] == t.shape[1:]
                    and buf.shape[0] >= t.shape[0])

        if not (fits(self._x_buf, x) and fits(self._y_buf, y)):
            def grown(buf, t):
                if fits(buf, t):
                    return buf
                rows = t.shape[0]
                if buf is not None and buf.dtype == t.dtype and buf.shape[1:] == t.shape[1:]:
                    rows = max(rows, buf.shape[0])
                return torch.empty((rows, *t.shape[1:]), dtype=t.dtype).share_memory_()

            # The old buffers are freed once the worker has swapped to the new ones.
            self._x_buf, self._y_buf = grown(self._x_buf, x), grown(self._y_buf, y)
            self._send(("inputs", self._x_buf, self._y_buf), "while receiving new input buffers")
        with torch.no_grad():
            self._x_buf[: x.shape[0]].copy_(x)
            self._y_buf[: y.shape[0]].copy_(y)

    def _read_perturbation(self) -> list[torch.Tensor]:
        device = self._main_device
        outputs = self._outputs.get(device)
        if outputs is None:
            flats = self._layout.allocate(device)
            self._outputs[device] = outputs = [flats, self._layout.views(flats)]
        flats, views = outputs
        for dtype, src in self._perturbation.items():
            # Pinned H2D is asynchronous: the next submit waits for this event before the
            # worker may write the shared buffer again.
            flats[dtype].copy_(src, non_blocking=device.type == "cuda" and self._pin(src))
        if device.type == "cuda":
            self._perturbation_read = torch.cuda.Event()
            self._perturbation_read.record(torch.cuda.current_stream(device))
        return views

    # -- the Perturber protocol

    def submit(self, step: int, weights: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> None:
        """Copy ``weights`` and the batch into shared memory and start the job; returns at once."""
        self._check_usable()
        if self._pending is not None:
            raise RuntimeError(f"submit() for step {step} while step {self._pending} is pending; collect() first")
        if self._perturbation_read is not None:
            # The last result's copy out of the shared buffer must end before a job rewrites it.
            self._perturbation_read.synchronize()
            self._perturbation_read = None
        self._write_weights(weights)
        self._write_inputs(x, y)
        self._main_device = weights[0].device if len(weights) else torch.device("cpu")
        self._send(("job", step, x.shape[0], y.shape[0]), f"when sent step {step}")
        self._pending = step
        self._handle.busy = True
        self._submitted_at = time.monotonic()

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
        self._check_usable()
        if self._pending is None:
            raise RuntimeError("collect() without a submitted job")
        step = self._pending
        deadline = job_deadline(self._submitted_at, self._timeout_s, timeout)
        def hung() -> str:
            return f"no result for step {step} after {time.monotonic() - self._submitted_at:.1f} s"

        message = self._receive(deadline, f"while computing step {step}", hung=hung)
        self._pending = None
        self._handle.busy = False
        if message[0] == "error":
            _, _, kind, text, tb = message
            raise WorkerError(f"perturbation worker pid {self.pid} raised {kind}: {text} (step {step})",
                              pid=self.pid, remote_traceback=tb)
        _, done_step, finite, seconds = message
        if done_step != step:
            raise self._fail(WorkerError(f"perturbation worker pid {self.pid} answered step {done_step}, "
                                         f"expected {step}", pid=self.pid))
        return PerturbationResult(step, self._read_perturbation() if finite else None, seconds)

    def worker_info(self, timeout: float = 10.0) -> dict:
        """What the worker sees of itself: pid, threads, cores per thread, environment, mode."""
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
        self._x_buf = self._y_buf = None
        self._weights = self._perturbation = {}
        self._weight_views = []
        self._perturbation_read = None
        self._staging.clear()
        self._outputs.clear()

    def __enter__(self) -> ProcessPerturber:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
