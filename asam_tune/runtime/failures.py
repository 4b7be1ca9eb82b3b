"""Worker failures: the perturber in use, and what happens when it dies, hangs, raises or will not start.

``SupervisedWorker`` holds the perturber ``AsyncSAM`` uses. Every call that can fail goes
through it; a ``WorkerError`` is re-raised (``on_worker_failure="raise"``) or turns into one
warning and a switch to the in-process perturber, after which ``AsyncSAM`` runs synchronous
SAM (``on_switch``). A worker that fails to start (a model or loss that cannot be pickled, too
little /dev/shm, a start timeout) is handled the same way.

Several ranks (torchrun, DDP): a switch changes what every rank computes, so a failure seen on
one rank waits for the step's agreement (``agree``, one int all_reduce at a fixed point of the
step); until then the in-process perturber stands in, so this step still gets its perturbation.
"""
from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

from asam_tune.errors import WorkerError
from asam_tune.perturbers.base import AscentJob, AscentTask, PerturbationResult, Perturber
from asam_tune.perturbers.in_process import InProcessPerturber

__all__ = ["SupervisedWorker"]


def _close_quietly(perturber: Perturber) -> None:
    try:
        perturber.close()
    except Exception:  # noqa: BLE001 - a dead worker may fail to close; there is nothing left to free
        pass


def _describe(exc: WorkerError) -> str:
    where = f"pid {exc.pid}, signal {exc.signal}" if exc.pid is not None or exc.signal is not None else ""
    return f"perturbation worker failed ({where}): {exc}" if where else f"perturbation worker failed: {exc}"


class SupervisedWorker:
    """The perturber in use, replaced by the in-process one when it fails (see the module docstring)."""

    def __init__(self, owner: object, task: AscentTask, *, policy: str, on_switch: Callable[[], None],
                 timeout_s: float):
        self.task = task
        self.policy = policy
        self.timeout_s = timeout_s
        self._on_switch = on_switch
        self.perturber: Perturber | None = None
        self.fallbacks = 0
        self.agreement: Any = None  # FailureAgreement while a worker that can fail runs beside others
        self.local_failure: WorkerError | None = None  # seen here, not yet agreed by all ranks
        self._owner = weakref.ref(owner)
        self._finalizer: weakref.finalize | None = None

    @property
    def concurrent(self) -> bool:
        """True while a worker runs beside the main step (not the in-process one)."""
        return self.perturber is not None and not isinstance(self.perturber, InProcessPerturber)

    def adopt(self, perturber: Perturber) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
        self.perturber = perturber
        owner = self._owner()
        # Closes the worker if the owner is dropped without close(): no orphan processes.
        self._finalizer = weakref.finalize(owner if owner is not None else self, _close_quietly, perturber)

    def start(self, factory: Callable[[AscentTask], Perturber]) -> None:
        """Start a worker; a start-up failure falls back like any other (or raises)."""
        try:
            self.adopt(factory(self.task))
        except WorkerError as exc:
            if self.policy == "raise":
                raise
            warnings.warn(f"asam-tune: {_describe(exc)}; continuing with synchronous SAM on the main device",
                          RuntimeWarning, stacklevel=4)
            self.adopt(InProcessPerturber(self.task, timeout_s=self.timeout_s))
            self.fallbacks += 1
            self._on_switch()

    def submit(self, job: AscentJob) -> bool:
        """Hand the job over; False when the worker failed (and was replaced) instead."""
        try:
            self.perturber.submit(job)
        except WorkerError as exc:
            self.failed(exc)
            return False
        return True

    def collect(self, timeout: float | None) -> PerturbationResult | None:
        """The job's result; None when the worker failed (and was replaced) instead."""
        try:
            return self.perturber.collect(timeout)
        except WorkerError as exc:
            self.failed(exc)
            return None

    def ready(self) -> bool | None:
        """True/False as the worker says; None when asking showed it had failed (and was replaced)."""
        try:
            return self.perturber.ready()
        except WorkerError as exc:
            self.failed(exc)
            return None

    def failed(self, exc: WorkerError) -> None:
        """Re-raise, or warn once and continue as synchronous SAM in-process."""
        if self.agreement is not None:
            if self.local_failure is None:
                self.local_failure = exc
            self._replace()
            return
        if self.policy == "raise":
            raise exc
        warnings.warn(f"asam-tune: {_describe(exc)}; continuing with synchronous SAM on the main device",
                      RuntimeWarning, stacklevel=5)
        self._switch()

    def agree(self, step: int) -> None:
        """All ranks learn whether any rank's worker failed, and all switch (or raise) now."""
        if self.agreement is None:
            return
        failed_rank = self.agreement.agree(self.local_failure is not None)
        if failed_rank is None:
            return
        exc, self.local_failure = self.local_failure, None
        self.agreement = None  # every rank computes in-process from here: nothing left to agree on
        if self.policy == "raise":
            if exc is not None:
                raise exc
            raise WorkerError(f"the perturbation worker of rank {failed_rank} failed; every rank stops "
                              f"in step {step} (on_worker_failure='raise')")
        cause = (f"this rank's {_describe(exc)}" if exc is not None
                 else f"the perturbation worker of rank {failed_rank} failed")
        warnings.warn(f"asam-tune: {cause}; every rank continues with synchronous SAM from step {step}",
                      RuntimeWarning, stacklevel=5)
        self._switch()

    def _replace(self) -> None:
        _close_quietly(self.perturber)
        self.adopt(InProcessPerturber(self.task, timeout_s=self.timeout_s))

    def _switch(self) -> None:
        self._replace()
        self.fallbacks += 1
        self._on_switch()

    def close(self) -> None:
        if self.local_failure is not None:  # failed in the last step: no later step to agree in
            warnings.warn(f"asam-tune: perturbation worker failed after the last agreed step: {self.local_failure}",
                          RuntimeWarning, stacklevel=3)
            self.local_failure = None
        if self._finalizer is not None:
            self._finalizer()  # closes the perturber once
        self.perturber = None
