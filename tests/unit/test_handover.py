"""The handover timing loop with a fake perturber and a fake clock: what is timed, what is not.

Fake durations are powers of two, so that clock differences are exact in binary.
"""
from __future__ import annotations

import pytest
import torch

from asam_tune.profiler.handover import time_handovers
from asam_tune.perturbers.base import AscentJob, PerturbationResult
from asam_tune.timing import FakeClock, MeasureSettings

SUBMIT_S = 2.0 ** -12
COLLECT_S = 2.0 ** -13
WORKER_S = 2.0 ** -8  # the worker's compute: waited for, never timed
SETTINGS = MeasureSettings(warmup=2, min_time_s=1.0, min_repeats=3, max_repeats=7, noise_threshold=0.1)


class FakePerturber:
    """Submit and collect take fixed fake times; the result is ready after a few polls."""

    def __init__(self, clock: FakeClock, perturbation: list[torch.Tensor] | None):
        self.clock = clock
        self.perturbation = perturbation
        self.steps: list[int] = []
        self.polls = 0

    def submit(self, job: AscentJob) -> None:
        x, y = job.batch
        assert x.shape[0] == y.shape[0] == 2
        self.steps.append(job.step)
        self.polls = 0
        self.clock.advance(SUBMIT_S)

    def ready(self) -> bool:
        self.polls += 1
        self.clock.advance(WORKER_S / 4)
        return self.polls >= 4

    def collect(self, timeout: float | None = None) -> PerturbationResult:
        assert self.polls >= 4, "collect() before the result was there"
        self.clock.advance(COLLECT_S)
        return PerturbationResult(self.steps[-1], self.perturbation, WORKER_S)


def _params() -> list[torch.Tensor]:
    return [torch.arange(6.0).view(2, 3), torch.ones(4)]


def test_a_sample_is_submit_plus_collect_and_never_the_wait():
    clock = FakeClock()
    params = _params()
    perturber = FakePerturber(clock, [torch.full((2, 3), 0.5), torch.full((4,), -1.0)])
    stats = time_handovers(perturber, params, (torch.zeros(2, 5), torch.zeros(2, dtype=torch.long)),
                           settings=SETTINGS, clock=clock)
    # Each sample is far below min_time_s: max_repeats samples, after the 2 warm-up handovers.
    assert stats.samples_s == (SUBMIT_S + COLLECT_S,) * 7
    assert perturber.steps == list(range(9))
    # Perturbed and restored, as AsyncSAM does: the weights end bit-identical.
    assert all(torch.equal(p, q) for p, q in zip(params, _params()))


def test_a_perturbation_that_is_not_finite_fails_the_measurement():
    clock = FakeClock()
    perturber = FakePerturber(clock, None)
    with pytest.raises(RuntimeError, match="not finite"):
        time_handovers(perturber, _params(), (torch.zeros(2, 5), torch.zeros(2, dtype=torch.long)),
                       settings=SETTINGS, clock=clock)
