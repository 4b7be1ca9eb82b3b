"""The one small interface between ``AsyncSAM`` and whatever computes the perturbation.

Implementations: ``InProcessPerturber`` (here: synchronous, on the main device; the reference
and the fallback), ``ProcessPerturber`` (a CPU worker process, ``process_worker.py``) and
``StreamPerturber`` (a second CUDA stream or another GPU, ``stream_worker.py``).

Protocol, one job at a time:
  submit(step, weights, x, y)  copy what the job needs and start it; returns at once
  ready()                      True when collect() would not wait
  collect(timeout)             the result, waiting at most ``timeout`` seconds; raises
                               WorkerError when the worker died, hung or raised. An expired
                               timeout is not "try again later": the worker counts as hung,
                               is killed (ProcessPerturber) or abandoned (StreamPerturber),
                               and stays unusable. Use ready() to poll.
  close()                      stop and free everything; idempotent
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from asam_tune.runtime.perturbation import ascent_perturbation, trainable_parameters


@dataclass
class PerturbationResult:
    step: int  # the step whose weights the perturbation was computed at
    # One tensor per trainable parameter, on the main device; None when the gradient was
    # not finite and the perturbation must be skipped.
    perturbation: list[torch.Tensor] | None
    compute_time_s: float  # worker-side time of the job


def job_deadline(submitted_at: float, timeout_s: float, timeout: float | None) -> float:
    """When ``collect(timeout)`` gives up: the job's own limit, or sooner if the caller asks."""
    deadline = submitted_at + timeout_s
    if timeout is not None:
        deadline = min(deadline, time.monotonic() + max(0.0, timeout))
    return deadline


class Perturber(Protocol):
    def submit(self, step: int, weights: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> None: ...

    def ready(self) -> bool: ...

    def collect(self, timeout: float) -> PerturbationResult: ...

    def close(self) -> None: ...


class InProcessPerturber:
    """Computes the perturbation synchronously on the main device, on a private replica.

    The replica keeps the main model's BatchNorm statistics out of the ascent pass: SAM's
    second forward must not update them (the main model's statistics move once per step).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, rho: float):
        self._replica = copy.deepcopy(model)
        self._replica.train()
        self._params = trainable_parameters(self._replica)
        self._loss_fn = loss_fn
        self._rho = rho
        self._result: PerturbationResult | None = None

    def submit(self, step: int, weights: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> None:
        started = time.perf_counter()
        with torch.no_grad():
            for p, w in zip(self._params, weights):
                p.copy_(w)
        with torch.enable_grad():
            e = ascent_perturbation(self._replica, self._loss_fn, x, y, self._rho)
        self._result = PerturbationResult(step, e, time.perf_counter() - started)

    def ready(self) -> bool:
        return self._result is not None

    def collect(self, timeout: float) -> PerturbationResult:
        if self._result is None:
            raise RuntimeError("collect() without a submitted job")
        result, self._result = self._result, None
        return result

    def close(self) -> None:
        self._result = None
