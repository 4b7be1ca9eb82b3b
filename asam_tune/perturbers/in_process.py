"""The ascent computed right away, on the main model itself: synchronous SAM, and the fallback.

No replica: the ascent differentiates the main model as it is, with its own frozen parameters,
buffers and module modes, so nothing can be stale, a model that cannot be copied still works,
and a fallback allocates no second model on a full GPU. What the ascent's forward writes into
the model's buffers (BatchNorm's running statistics in train mode) is put back afterwards: the
main model's statistics move once per step, in the descent. Its random draws (dropout) come
from the job's seed, and the caller's random state is left as it was.
"""
from __future__ import annotations

import time

import torch

from asam_tune.perturbers.ascent import ascent_perturbation, parameters_at, seeded
from asam_tune.perturbers.base import AscentJob, AscentTask, PerturbationResult, PerturberBase
from asam_tune.perturbers.weights import WeightSwap

__all__ = ["InProcessPerturber"]


class InProcessPerturber(PerturberBase):
    """Computes each job at ``submit``, in the caller's thread; ``collect`` hands the result over."""

    name = "in-process perturbation"

    def __init__(self, task: AscentTask, *, timeout_s: float = 60.0):
        super().__init__(task, timeout_s=timeout_s)
        self._result: PerturbationResult | None = None

    def submit(self, job: AscentJob) -> None:
        self._begin(job)
        model = self.task.model
        params = parameters_at(model, self.task.perturbed)
        # AsyncSAM hands over the parameters themselves (the model holds w_t); other weights
        # are swapped in for the job and out again.
        swap = None
        if any(w.data_ptr() != p.data_ptr() for w, p in zip(job.weights, params)):
            swap = WeightSwap(params)
            swap.keep()
            with torch.no_grad():
                torch._foreach_copy_(params, [w.to(p.device, p.dtype) for w, p in zip(job.weights, params)])
        # All of them: BatchNorm's kernel writes its statistics without bumping their versions.
        buffers = [b for b in model.buffers()]
        saved = [b.detach().clone() for b in buffers]
        device = params[0].device if params else None
        started = time.perf_counter()
        try:
            with seeded(job.seed, device), torch.enable_grad():
                e = ascent_perturbation(model, self.task.compute_loss, job.batch, params, job.rho,
                                        adaptive=self.task.adaptive)
        finally:
            with torch.no_grad():
                for b, kept in zip(buffers, saved):
                    b.copy_(kept)
            if swap is not None:
                swap.restore()
        ended = time.perf_counter()
        self._result = PerturbationResult(job.step, e, ended - started, started, ended)
        self._started(job.step)

    def ready(self) -> bool:
        return self._pending is not None and not self._closed

    def collect(self, timeout: float | None = None) -> PerturbationResult:
        self._take_pending()
        result, self._result = self._result, None
        self._pending = None
        return result

    def close(self) -> None:
        self._closed = True
        self._pending = None
        self._result = None
