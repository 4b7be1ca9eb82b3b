"""The one small interface between ``AsyncSAM`` and whatever computes the perturbation.

Implementations: ``InProcessPerturber`` (synchronous, on the main model itself: the reference
and the fallback), ``ProcessPerturber`` (a CPU worker process), ``StreamPerturber`` (a second
CUDA stream or another GPU) and ``FakePerturber`` (scripted failures, for tests). Every one is
built over the main model and the base optimizer's parameter positions (``AscentTask``) and
follows the main model's state on its own (``state_sync.py``).

Protocol, one job at a time:
  submit(job)        copy what the job needs (weights, the ascent batch) and start it; returns
                     at once. The job's weights are the perturbed parameters' values.
  ready()            True when collect() would not wait
  collect(timeout)   the result, waiting at most ``timeout`` seconds (None: the worker's own job
                     limit); raises WorkerError when the worker died, hung or raised. An expired
                     timeout is not "try again later": the worker counts as hung, is stopped,
                     and stays unusable. Use ready() to poll.
  close()            stop and free everything; idempotent
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from asam_tune.errors import UserInputError, WorkerError

__all__ = ["AscentJob", "AscentTask", "PerturbationResult", "Perturber", "PerturberBase", "job_deadline"]


@dataclass(frozen=True)
class AscentTask:
    """What every job of a run shares: the model, which of its parameters to perturb, the loss."""

    model: nn.Module  # the main model (DDP's inner module): the worker's source of truth
    perturbed: tuple[int, ...]  # positions in model.parameters() of the perturbed parameters
    compute_loss: Callable[[nn.Module, Any], Any]  # compute_loss(model, batch) -> loss
    adaptive: bool = False


@dataclass(frozen=True)
class AscentJob:
    step: int  # the step whose weights ``weights`` are (w_step)
    weights: Sequence[torch.Tensor]  # one per perturbed parameter
    batch: Any  # the ascent batch, already cut to b_p samples
    rho: float
    seed: int  # dropout and every other random draw of the ascent's forward


@dataclass
class PerturbationResult:
    step: int  # the step whose weights the perturbation was computed at
    # One tensor per perturbed parameter, on the main device; None when the gradient was
    # not finite and the perturbation must be skipped.
    perturbation: list[torch.Tensor] | None
    compute_time_s: float  # worker-side time of the job
    # When the job ran, on the worker's time.perf_counter() (one clock system-wide on Linux);
    # None where the worker does not say.
    started_at: float | None = None
    ended_at: float | None = None


class Perturber(Protocol):
    def submit(self, job: AscentJob) -> None: ...

    def ready(self) -> bool: ...

    def collect(self, timeout: float | None = None) -> PerturbationResult: ...

    def close(self) -> None: ...


def job_deadline(submitted_at: float, timeout_s: float, timeout: float | None) -> float:
    """When ``collect(timeout)`` gives up: the job's own limit, or sooner if the caller asks."""
    deadline = submitted_at + timeout_s
    if timeout is not None:
        deadline = min(deadline, time.monotonic() + max(0.0, timeout))
    return deadline


def check_timeout(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value == value or value <= 0 \
            or value == float("inf"):
        raise UserInputError(f"Invalid {name}: {value!r} (need a positive number of seconds)")
    return float(value)


class PerturberBase:
    """The bookkeeping every worker shares: one pending job, a deadline, broken for good, closed."""

    name = "perturbation worker"

    def __init__(self, task: AscentTask, *, timeout_s: float = 60.0):
        self.task = task
        self.timeout_s = check_timeout("worker_timeout_s", timeout_s)
        self._pending: int | None = None
        self._submitted_at = 0.0
        self._broken: WorkerError | None = None
        self._closed = False

    def _check_usable(self) -> None:
        if self._broken is not None:
            b = self._broken
            raise WorkerError(f"the {self.name} is no longer usable: {b}", pid=b.pid, signal=b.signal,
                              remote_traceback=b.remote_traceback)
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")

    def _begin(self, job: AscentJob) -> None:
        """Checks before a submit: usable, nothing pending, one weight per perturbed parameter."""
        self._check_usable()
        if self._pending is not None:
            raise RuntimeError(f"submit() for step {job.step} while step {self._pending} is pending; collect() first")
        if len(job.weights) != len(self.task.perturbed):
            raise UserInputError(f"Invalid weights: got {len(job.weights)} tensors, the model has "
                                 f"{len(self.task.perturbed)} perturbed parameters")

    def _started(self, step: int) -> None:
        self._pending = step
        self._submitted_at = time.monotonic()

    def _take_pending(self) -> int:
        self._check_usable()
        if self._pending is None:
            raise RuntimeError("collect() without a submitted job")
        return self._pending

    def _deadline(self, timeout: float | None) -> float:
        return job_deadline(self._submitted_at, self.timeout_s, timeout)

    def _fail(self, error: WorkerError) -> WorkerError:
        """Mark the worker unusable for good; returns ``error`` for raising."""
        self._broken = error
        self._pending = None
        return error

    def _waited(self) -> float:
        return time.monotonic() - self._submitted_at

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:  # pragma: no cover - every worker overrides it
        raise NotImplementedError


def remote_error_name(exc: BaseException) -> str:
    kind = type(exc)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
