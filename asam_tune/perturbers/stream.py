"""The CUDA perturbation worker: a replica on another GPU, or on a second stream of the main GPU.

The job runs on a Python thread (torch releases the GIL inside its kernels and the sync) and on
a dedicated ``torch.cuda.Stream``, so ``submit`` returns at once and the main stream never
waits for the ascent pass. Stream order is kept with stream-to-stream waits, never by a host
synchronisation on the main thread:

- submit: the worker stream waits for the main stream (the weights ``w_t`` are what it leaves),
  brings the replica's other parameters, buffers and modes up to the main model
  (``ReplicaSync``), copies weights and batch, and the main stream waits for those copies (it
  will overwrite the weights with ``w_t + e_t`` next);
- the job: forward, backward and the perturbation on the worker stream; the worker thread then
  synchronises that stream, so ``ready()`` means the result is on the device;
- collect: the perturbation is copied into buffers on the main device on the worker stream,
  and the main stream waits for that copy.

Random draws (dropout) in the ascent come from the device's generator as they are: seeding it
from this thread would race with the main thread's own draws.
"""
from __future__ import annotations

import queue
import threading
import time
import traceback
from collections.abc import Callable

import torch

from asam_tune.errors import UserInputError, WorkerError
from asam_tune.perturbers.ascent import ascent_perturbation, parameters_at
from asam_tune.perturbers.base import AscentJob, AscentTask, PerturbationResult, PerturberBase, remote_error_name
from asam_tune.perturbers.batches import map_tensors
from asam_tune.perturbers.replica import replica_on
from asam_tune.perturbers.state_sync import ReplicaSync

__all__ = ["JobThread", "StreamPerturber"]

_POLL_S = 0.05
_STOP_TIMEOUT_S = 5.0


class JobThread:
    """Runs one job at a time on a daemon thread; the caller waits with a timeout, never without.

    A job's exception is kept with its traceback and the thread goes on to the next job.
    """

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._outcome: tuple | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def name(self) -> str:
        return self._thread.name

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                outcome = ("ok", job())
            except Exception as exc:  # noqa: BLE001 - handed to the caller of wait()
                outcome = ("error", exc, traceback.format_exc())
            self._outcome = outcome
            self._done.set()

    def start(self, job: Callable[[], object]) -> None:
        self._outcome = None
        self._done.clear()
        self._jobs.put(job)

    def done(self) -> bool:
        return self._done.is_set()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def wait(self, deadline: float) -> tuple | None:
        """``("ok", value)`` or ``("error", exc, traceback)``; None when ``deadline`` passed first.

        Raises RuntimeError if the thread is gone without an outcome.
        """
        while not self._done.wait(max(0.0, min(_POLL_S, deadline - time.monotonic()))):
            if not self._thread.is_alive():
                raise RuntimeError(f"thread {self.name} ended without finishing its job")
            if time.monotonic() >= deadline:
                return None
        return self._outcome

    def stop(self, timeout: float) -> bool:
        """Ask the thread to end after its current job; True if it ended within ``timeout``."""
        self._jobs.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()


def _cuda_device(device: str | torch.device) -> torch.device:
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UserInputError(f"Invalid device: {device!r} ({exc})") from None
    if d.type != "cuda":
        raise UserInputError(f"Invalid device: {device!r} (StreamPerturber needs a CUDA device)")
    if not torch.cuda.is_available():
        raise UserInputError(f"Invalid device: {device!r} (CUDA is not available here)")
    index = torch.cuda.current_device() if d.index is None else d.index
    if not 0 <= index < torch.cuda.device_count():
        raise UserInputError(f"Invalid device: {device!r} (there are {torch.cuda.device_count()} CUDA devices)")
    return torch.device("cuda", index)


class StreamPerturber(PerturberBase):
    """Computes SAM's ascent perturbation on a CUDA stream of its own, concurrently with the caller.

    ``device`` holds the replica. ``secondary_stream=True`` says it is the main GPU itself (the
    model's device): the job shares that GPU on a second stream. ``secondary_stream=False`` says
    it is another GPU. Either way the job never runs on the main stream.

    The perturbation tensors ``collect`` returns are buffers on the main device that this
    perturber owns and reuses: they are valid until the next ``collect``; the main stream is
    already ordered after their copy.

    Errors: an exception inside a job raises WorkerError with the remote type, message and
    ``remote_traceback``, and the worker stays usable; a job that runs past ``timeout_s`` raises
    WorkerError (hung) and the perturber is unusable from then on (a thread cannot be killed;
    it is a daemon and is abandoned). Not thread-safe: one caller.
    """

    def __init__(self, task: AscentTask, *, device: str | torch.device, secondary_stream: bool,
                 timeout_s: float = 60.0):
        super().__init__(task, timeout_s=timeout_s)
        self._device = _cuda_device(device)
        params = list(task.model.parameters())
        model_device = params[0].device if params else self._device
        if secondary_stream and model_device != self._device:
            raise UserInputError(f"Invalid device: {device!r} (secondary_stream=True shares the model's own "
                                 f"device, which is {model_device})")
        if not secondary_stream and model_device == self._device:
            raise UserInputError(f"Invalid device: {device!r} is the model's own device; "
                                 f"use secondary_stream=True to share it")
        self.secondary_stream = secondary_stream
        self.name = f"perturbation worker thread on {self._device}"
        self._replica = replica_on(task.model, self._device)
        self._sync = ReplicaSync(task.model, self._replica, task.perturbed)
        self._params = parameters_at(self._replica, task.perturbed)
        self._stream = torch.cuda.Stream(device=self._device)
        self._runner = JobThread(name=f"asam-perturbation-{self._device}")
        self._main_device: torch.device | None = None
        self._outputs: list[torch.Tensor] | None = None

    def submit(self, job: AscentJob) -> None:
        """Queue the copies and the job on the worker stream; returns at once."""
        self._begin(job)
        for i, (w, p) in enumerate(zip(job.weights, self._params)):
            if w.shape != p.shape:
                raise UserInputError(f"Invalid weights[{i}]: shape {tuple(w.shape)}, expected {tuple(p.shape)}")
        main_device = job.weights[0].device if job.weights else self._device
        if main_device.type != "cuda":
            raise UserInputError(f"Invalid weights: on {main_device}; StreamPerturber needs them on a CUDA device")
        main = torch.cuda.current_stream(main_device)
        stream = self._stream
        device = self._device

        def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
            dst.copy_(src, non_blocking=True)

        with torch.cuda.stream(stream), torch.no_grad():
            stream.wait_stream(main)  # w_t is what the main stream's queued work leaves
            self._sync.sync(copy)
            for p, w in zip(self._params, job.weights):
                p.copy_(w, non_blocking=True)
            # Always a copy, made on the worker stream: the caller may free or reuse the batch.
            batch = map_tensors(job.batch, lambda t: t.to(device, non_blocking=True, copy=True))
        main.wait_stream(stream)  # the main stream perturbs w_t in place next; the copies go first
        task, params, rho = self.task, self._params, float(job.rho)

        def run():
            started = time.perf_counter()
            with torch.cuda.stream(stream), torch.enable_grad():
                e = ascent_perturbation(self._replica, task.compute_loss, batch, params, rho, adaptive=task.adaptive)
            stream.synchronize()
            ended = time.perf_counter()
            return e, started, ended

        self._main_device = main_device
        self._started(job.step)
        self._runner.start(run)

    def ready(self) -> bool:
        if self._pending is None or self._closed:
            return False
        return self._broken is not None or self._runner.done() or not self._runner.is_alive()

    def collect(self, timeout: float | None = None) -> PerturbationResult:
        """The pending job's result; waits at most ``timeout`` s (None: the job's ``timeout_s``)."""
        step = self._take_pending()
        try:
            outcome = self._runner.wait(self._deadline(timeout))
        except RuntimeError as exc:
            raise self._fail(WorkerError(f"{self.name} died while computing step {step}: {exc}")) from None
        if outcome is None:
            raise self._fail(WorkerError(f"{self.name} hung: no result for step {step} after "
                                         f"{self._waited():.1f} s (worker_timeout_s sets the limit)"))
        self._pending = None
        if outcome[0] == "error":
            _, exc, tb = outcome
            text = " ".join(str(exc).splitlines())
            raise WorkerError(f"{self.name} raised {remote_error_name(exc)}: {text} (step {step})",
                              remote_traceback=tb)
        e, started, ended = outcome[1]
        if e is None:
            return PerturbationResult(step, None, ended - started, started, ended)
        main = torch.cuda.current_stream(self._main_device)
        if self._outputs is None or any(o.device != self._main_device for o in self._outputs[:1]):
            self._outputs = [torch.empty_like(t, device=self._main_device) for t in e]
        stream = self._stream
        with torch.cuda.stream(stream), torch.no_grad():
            stream.wait_stream(main)  # the main stream may still be reading the previous result
            for out, t in zip(self._outputs, e):
                out.copy_(t, non_blocking=True)
        main.wait_stream(stream)
        return PerturbationResult(step, self._outputs, ended - started, started, ended)

    def close(self) -> None:
        """Stop the worker thread and free the replica; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pending = None
        if self._runner.is_alive():
            self._runner.stop(_STOP_TIMEOUT_S if self._broken is None else 0.0)
        self._outputs = None
        self._replica = None
        self._params = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass
