"""The jobs handed to the worker and the results collected, each timed.

``AsyncSAM`` decides what a job is (which step it serves, which samples, which rho);
``JobTraffic`` moves it: it hands the job over, waits for the result or asks whether it is
done, and records every wait in the statistics, the timeline and the online adapter. The
``PerturbationSchedule`` it keeps says which collected result serves which step.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from asam_tune.perturbers.base import AscentJob, PerturbationResult
from asam_tune.perturbers.tracing import nvtx_range
from asam_tune.runtime.adaptation_feed import AdaptationFeed
from asam_tune.runtime.failures import SupervisedWorker
from asam_tune.runtime.schedule import PerturbationSchedule
from asam_tune.runtime.stats import StatsRecorder, TimelineRecorder

__all__ = ["JobTraffic"]


class JobTraffic:
    def __init__(self, worker: SupervisedWorker, stats: StatsRecorder, timeline: TimelineRecorder | None,
                 feed: AdaptationFeed | None, clock: Callable[[], float], timeout_s: float, nvtx: bool = False):
        self.worker, self.stats, self.timeline, self.feed = worker, stats, timeline, feed
        self.nvtx = nvtx  # NVTX ranges around the handover and the wait
        self.schedule = PerturbationSchedule()
        self._clock, self._timeout = clock, timeout_s

    def submit(self, job: AscentJob, serves_step: int) -> bool:
        """Hand ``job`` over; the handover's time is the main step's wait. False: not taken."""
        started = self._clock()
        with nvtx_range("asam handover", self.nvtx):
            ok = self.worker.submit(job)
        submitted = self._clock()
        self.stats.add_wait(submitted - started)
        if self.timeline is not None:
            self.timeline.add("handover", job.step, started, submitted)
        if self.feed is not None:
            self.feed.submitted(submitted)
        if ok:
            self.schedule.launched(serves_step, job.step)
        return ok

    def collect(self, step: int, current: PerturbationResult | None, perturbed_count: int, *,
                non_blocking: bool, ready: bool | None = None) -> None:
        """Wait for the job in flight and hold its result. ``ready``: known to be done."""
        schedule = self.schedule
        schedule.own_borrowed(current)
        serves_step = schedule.landed()
        timed = self.feed is not None and self.feed.adapter is not None and schedule.inflight_ahead
        if timed and ready is None:
            # A collect that does not block only copies the result out: that copy is not a wait.
            ready = self.worker.ready()
            if ready is None:
                return  # asking showed the worker had failed; it was replaced
        started = self._clock()
        with nvtx_range("asam wait", self.nvtx):
            result = self.worker.collect(self._timeout)
        ended = self._clock()
        self.stats.add_wait(ended - started)
        if self.timeline is not None:
            self.timeline.add("wait", step, started, ended)
            if result is not None and self._clock is time.perf_counter:  # the worker's times are perf_counter's
                self.timeline.add("ascent", serves_step, result.started_at, result.ended_at)
        if result is None:
            return
        if result.perturbation is not None and len(result.perturbation) != perturbed_count:
            raise RuntimeError(f"worker returned {len(result.perturbation)} tensors for "
                               f"{perturbed_count} perturbed parameters")
        self.stats.add_compute(result.compute_time_s)
        schedule.hold(serves_step, result)
        if timed:
            self.feed.collected(non_blocking=non_blocking, for_this_step=serves_step == step,
                                compute_s=result.compute_time_s, ready=bool(ready), started=started, ended=ended)

    def poll(self, step: int, current: PerturbationResult | None, perturbed_count: int) -> None:
        """Non-blocking mode: collect the job in flight only if it is done."""
        if self.schedule.inflight is None:
            return
        done = self.worker.ready()
        if done is None:
            self.schedule.inflight = None
        elif done:
            self.collect(step, current, perturbed_count, non_blocking=True, ready=True)
