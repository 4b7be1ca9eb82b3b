"""The CUDA perturbation worker: on a second stream of the main GPU, or on another GPU.

The job runs on a Python thread (torch releases the GIL inside its kernels and the sync) and on
a dedicated stream, so ``submit`` returns at once and the main stream never waits for the
host. Stream order is kept with stream-to-stream waits and events (``device_layer.py``: every
CUDA call goes through a ``DeviceLayer``, so a recording fake can check the order on a CPU):

- submit: the worker stream waits for the main stream (the weights ``w_t`` are what it leaves),
  brings the replica's other parameters, buffers and modes up to the main model
  (``ReplicaSync``), copies weights and batch, records an event, and the main stream waits for
  that event (it will overwrite the weights with ``w_t + e_t`` next);
- the job: forward, backward and the perturbation on the worker stream; the worker thread then
  synchronises that stream, so ``ready()`` means the result is on the device;
- collect: the main stream waits for the worker stream; on another GPU the perturbation is
  first copied to buffers on the main device, on the worker stream.

Memory. On the main GPU itself the worker holds a *snapshot replica* (``replica.py``): one
copy of the perturbed weights, the model's own other parameters, cloned buffers; the result is
handed over as it is, without a second copy. Its extra GPU memory is the snapshot and the
perturbation (2x the perturbed weights, and the gradients while a job runs), against 4x with a
full replica and an output copy. On another GPU the replica is a full copy there.

Random draws. Seeding the device's generator from this thread would race with the main
thread's own draws, so the replica's dropout modules draw from a generator of the worker's own
(``seeded_dropout.py``), seeded with each job's seed: the ascent's masks repeat, and the main
step's are untouched. Dropout called as a function inside a model still draws from the
device's generator.
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
from asam_tune.perturbers.device_layer import CudaLayer, DeviceLayer
from asam_tune.perturbers.base import (AscentJob, AscentTask, PerturbationResult, PerturberBase, check_timeout,
                                      remote_error_name)
from asam_tune.perturbers.batches import map_tensors
from asam_tune.perturbers.replica import replica_on, snapshot_replica
from asam_tune.perturbers.seeded_dropout import use_seeded_dropout
from asam_tune.perturbers.state_sync import ReplicaSync
from asam_tune.perturbers.tracing import nvtx_range

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


class StreamPerturber(PerturberBase):
    """Computes SAM's ascent perturbation on a CUDA stream of its own, concurrently with the caller.

    ``device`` is where the job runs. ``secondary_stream=True`` says it is the main GPU itself
    (the model's device): the job shares that GPU on a second stream, over a snapshot replica.
    ``secondary_stream=False`` says it is another GPU, with a full replica there. Either way
    the job never runs on the main stream. ``layer`` is the CUDA layer (a fake in CPU tests).

    The perturbation tensors ``collect`` returns are valid until the next ``collect``; the main
    stream is already ordered after them.

    Errors: an exception inside a job raises WorkerError with the remote type, message and
    ``remote_traceback``, and the worker stays usable; a job that runs past ``timeout_s`` raises
    WorkerError (hung) and the perturber is unusable from then on (a thread cannot be killed;
    it is a daemon and is abandoned). Not thread-safe: one caller.
    """

    def __init__(self, task: AscentTask, *, device: str | torch.device, secondary_stream: bool,
                 timeout_s: float = 60.0, start_timeout_s: float = 60.0, layer: DeviceLayer | None = None):
        super().__init__(task, timeout_s=timeout_s)
        start_timeout_s = check_timeout("worker_start_timeout_s", start_timeout_s)
        self._layer = layer if layer is not None else CudaLayer()
        self._device = self._layer.check_device(device)
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
        self._runner = JobThread(name=f"asam-perturbation-{self._device}")
        self._main_device: torch.device | None = None
        self._outputs: list[torch.Tensor] | None = None
        self._caller_stream = self._layer.current_stream(model_device) if secondary_stream else None
        # The replica is made on the worker's own thread: a CUDA context on another GPU, or a
        # copy that does not finish, cannot hang the caller past ``start_timeout_s``.
        self._runner.start(self._setup)
        try:
            outcome = self._runner.wait(time.monotonic() + start_timeout_s)
        except RuntimeError as exc:
            outcome = ("error", exc, "")
        if outcome is None:
            error = self._fail(WorkerError(f"{self.name} did not start within {start_timeout_s:g} s "
                                           "(worker_start_timeout_s sets the limit)"))
            self.close()
            raise error
        if outcome[0] == "error":
            self.close()
            _, exc, tb = outcome
            if isinstance(exc, UserInputError):
                raise exc
            raise WorkerError(f"{self.name} failed to start: {remote_error_name(exc)}: {exc}", remote_traceback=tb)

    def _setup(self) -> None:
        task, layer = self.task, self._layer
        self._stream = layer.new_stream(self._device)
        if self.secondary_stream:
            # The clones read the main model as the caller's stream leaves it; they belong to
            # the worker stream's memory.
            layer.wait_stream(self._stream, self._caller_stream)
            with layer.on_stream(self._stream), torch.no_grad():
                self._replica = snapshot_replica(task.model, task.perturbed)
        else:
            self._replica = replica_on(task.model, self._device)
        self._dropout = torch.Generator(device=self._device)
        use_seeded_dropout(self._replica, self._dropout)
        self._sync = ReplicaSync(task.model, self._replica, task.perturbed)
        self._params = parameters_at(self._replica, task.perturbed)

    def submit(self, job: AscentJob) -> None:
        """Queue the copies and the job on the worker stream; returns at once."""
        self._begin(job)
        for i, (w, p) in enumerate(zip(job.weights, self._params)):
            if w.shape != p.shape:
                raise UserInputError(f"Invalid weights[{i}]: shape {tuple(w.shape)}, expected {tuple(p.shape)}")
        layer = self._layer
        main_device = job.weights[0].device if job.weights else self._device
        if not layer.is_accelerator(main_device):
            raise UserInputError(f"Invalid weights: on {main_device}; StreamPerturber needs them on a CUDA device")
        main = layer.current_stream(main_device)
        stream = self._stream
        device = self._device
        task = self.task

        def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
            layer.copy_(dst, src, stream)

        def to_device(t: torch.Tensor) -> torch.Tensor:
            # Allocated on the worker stream (its memory is that stream's); the source may be
            # freed by the caller once the main stream has passed the copy.
            out = torch.empty(t.shape, dtype=t.dtype, device=device)
            copy(out, t)
            return out

        with layer.on_stream(stream), torch.no_grad():
            layer.wait_stream(stream, main)  # w_t is what the main stream's queued work leaves
            self._sync.sync(copy)
            for p, w in zip(self._params, job.weights):
                copy(p, w)
            # Always a copy, made on the worker stream: the caller may free or reuse the batch.
            batch = map_tensors(job.batch, to_device)
            copied = layer.record(stream)
        layer.wait_event(main, copied)  # the main stream perturbs w_t in place next; the copies go first
        params, rho, step, seed = self._params, float(job.rho), job.step, int(job.seed)

        def run():
            self._dropout.manual_seed(seed)  # jobs run one after another on this thread
            started = time.perf_counter()
            with layer.on_stream(stream), nvtx_range(lambda: f"asam ascent {step}", task.nvtx), torch.enable_grad():
                e = ascent_perturbation(self._replica, task.compute_loss, batch, params, rho, adaptive=task.adaptive,
                                        autocast_dtype=task.ascent_dtype)
                layer.synchronize(stream)
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
        layer, stream = self._layer, self._stream
        main = layer.current_stream(self._main_device)
        if self.secondary_stream:
            # Handed over as it is: the main stream reads it after the job, and the allocator
            # must not give its memory back to the worker stream before the main stream is done.
            for t in e:
                layer.keep_alive(t, main)
            layer.wait_event(main, layer.record(stream))
            return PerturbationResult(step, e, ended - started, started, ended)
        if self._outputs is None or any(o.device != self._main_device for o in self._outputs[:1]):
            self._outputs = [torch.empty_like(t, device=self._main_device) for t in e]
        with layer.on_stream(stream), torch.no_grad():
            layer.wait_stream(stream, main)  # the main stream may still be reading the previous result
            for out, t in zip(self._outputs, e):
                layer.copy_(out, t, stream)
            returned = layer.record(stream)
        layer.wait_event(main, returned)
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
        self._sync = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass
