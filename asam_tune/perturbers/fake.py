"""A worker for tests: a replica in this process, with scripted deaths, errors, hangs and delays.

It computes exactly what a real worker computes (the same ascent on a replica kept in step
with the main model by ``ReplicaSync``, the logic the CUDA-stream worker uses), so a test can
check AsyncSAM's schedule and failure handling, and the replica bookkeeping, without processes
or a GPU. The script maps a job's ordinal (0 for the first submit) to what goes wrong:

  "die"    collect() raises WorkerError (as if killed by SIGKILL); unusable from then on
  "raise"  collect() raises WorkerError carrying a remote traceback; the worker stays usable
  "hang"   collect() raises WorkerError (hung) at once, as if the deadline had passed; unusable
  "nan"    the job's gradient is not finite: the result's perturbation is None
  "submit" submit() itself raises WorkerError (a broken pipe); unusable

``ready_after_s`` makes ``ready()`` say False until that long after submit, for schedules
that poll; ``clock`` is the time it reads.
"""
from __future__ import annotations

import signal
import time
import traceback
from collections.abc import Callable, Mapping

import torch

from asam_tune.errors import WorkerError
from asam_tune.perturbers.ascent import ascent_perturbation, parameters_at, seeded
from asam_tune.perturbers.base import AscentJob, AscentTask, PerturbationResult, PerturberBase, remote_error_name
from asam_tune.perturbers.replica import replica_on
from asam_tune.perturbers.state_sync import ReplicaSync

__all__ = ["FakePerturber", "FAULTS"]

FAULTS = ("die", "raise", "hang", "nan", "submit")


class FakePerturber(PerturberBase):
    name = "fake perturbation worker"

    def __init__(self, task: AscentTask, *, timeout_s: float = 60.0, script: Mapping[int, str] | None = None,
                 ready_after_s: float = 0.0, clock: Callable[[], float] = time.monotonic):
        super().__init__(task, timeout_s=timeout_s)
        self.script = dict(script or {})
        unknown = sorted(set(self.script.values()) - set(FAULTS))
        if unknown:
            raise ValueError(f"unknown faults {unknown} (expected some of {FAULTS})")
        self.ready_after_s = ready_after_s
        self.clock = clock
        self.replica = replica_on(task.model, "cpu")
        self.sync = ReplicaSync(task.model, self.replica, task.perturbed)
        self.params = parameters_at(self.replica, task.perturbed)
        self.jobs: list[AscentJob] = []  # every job submitted, in order
        self.pid = None
        self._result: PerturbationResult | None = None
        self._fault: str | None = None
        self._error: tuple[BaseException, str] | None = None
        self._submitted_clock = 0.0

    def submit(self, job: AscentJob) -> None:
        self._begin(job)
        fault = self.script.get(len(self.jobs))
        self.jobs.append(job)
        if fault == "submit":
            raise self._fail(WorkerError("fake perturbation worker: broken pipe when sent the job", pid=None))
        self.sync.sync()
        started = time.perf_counter()
        with torch.no_grad():
            for p, w in zip(self.params, job.weights):
                p.copy_(w)
        try:
            with seeded(job.seed), torch.enable_grad():
                e = ascent_perturbation(self.replica, self.task.compute_loss, job.batch, self.params, job.rho,
                                        adaptive=self.task.adaptive)
        except Exception as exc:  # noqa: BLE001 - reported at collect(), as a worker would
            self._error = (exc, traceback.format_exc())
            e = None
        ended = time.perf_counter()
        if fault == "nan":
            e = None
        if e is not None:
            device = job.weights[0].device if job.weights else torch.device("cpu")
            e = [t.to(device) for t in e]
        self._result = PerturbationResult(job.step, e, ended - started, started, ended)
        self._fault = fault
        self._submitted_clock = self.clock()
        self._started(job.step)

    def ready(self) -> bool:
        if self._pending is None or self._closed:
            return False
        return self._broken is not None or self.clock() - self._submitted_clock >= self.ready_after_s

    def collect(self, timeout: float | None = None) -> PerturbationResult:
        step = self._take_pending()
        fault, self._fault = self._fault, None
        result, self._result = self._result, None
        self._pending = None
        if fault == "die":
            raise self._fail(WorkerError(f"fake perturbation worker was killed by SIGKILL (signal 9) while "
                                         f"computing step {step}", signal=int(signal.SIGKILL)))
        if fault == "hang":
            raise self._fail(WorkerError(f"fake perturbation worker hung: no result for step {step}"))
        if fault == "raise":
            raise WorkerError(f"fake perturbation worker raised RuntimeError: scripted (step {step})",
                              remote_traceback="Traceback (most recent call last):\nRuntimeError: scripted\n")
        error, self._error = self._error, None
        if error is not None:
            exc, tb = error
            text = " ".join(str(exc).splitlines())
            raise WorkerError(f"fake perturbation worker raised {remote_error_name(exc)}: {text} (step {step})",
                              remote_traceback=tb)
        return result

    def close(self) -> None:
        self._closed = True
        self._pending = None
        self._result = None
