"""What the online adapter is fed: each step's time, its wait for the worker, the worker's idle time.

``AsyncSAM`` reports the moments that matter (a job handed over, a result collected, a step
that went on without its result, a step finished); ``AdaptationFeed`` turns them into one
observation per step for the ``BatchSizeAdapter`` (runtime/adaptation.py) and hands back the
``b_p`` for the next job. Steps whose perturbation was computed on the spot (step 0, the first
step of a ``lookahead()``, after a fallback) are not fed. In non-blocking mode nothing blocks:
a result that was not there when its step began counts as the wait a staleness-1 step would
have had (its estimated finish minus that step's start).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from asam_tune.runtime.adaptation import AdaptationSettings, BatchSizeAdapter

__all__ = ["AdaptationFeed"]


class AdaptationFeed:
    def __init__(self, settings: AdaptationSettings, bound: int | None, clock: Callable[[], float],
                 floor_fraction: float | None = None):
        self.settings = settings
        self.bound = bound  # the plan's batch size; without a plan, the first batch's
        self.floor_fraction = floor_fraction  # the plan's quality floor, b_p / B
        self.clock = clock
        self.adapter: BatchSizeAdapter | None = None
        self.submitted_at = 0.0  # when the last job was handed over
        self.needed_at: float | None = None  # non-blocking: its step began without its result
        self._observed: tuple[float, float, float] | None = None  # (waited, idle, missed) this step
        self._last_finish: float | None = None

    def start(self, perturbation_batch_size: int | None, first_batch_size: int) -> int:
        """Start at the first job; returns the b_p to use (the given one, within the bound)."""
        bound = self.bound or first_batch_size
        initial = min(perturbation_batch_size or bound, bound)
        floor = 1 if not self.floor_fraction else max(1, math.ceil(self.floor_fraction * bound - 1e-9))
        self.adapter = BatchSizeAdapter(initial, bound, self.settings, floor=floor)
        return self.adapter.batch_size

    def step_started(self) -> None:
        # The first step after construction or a resume has no previous finish: timed from here.
        if self._last_finish is None:
            self._last_finish = self.clock()

    def submitted(self, at: float) -> None:
        self.submitted_at = at
        self.needed_at = None

    def went_on_without(self) -> None:
        """Non-blocking: this step goes on without the job in flight's result."""
        if self.needed_at is None:
            self.needed_at = self.clock()

    def collected(self, *, non_blocking: bool, for_this_step: bool, compute_s: float, ready: bool,
                  started: float, ended: float) -> None:
        """This step's view of the worker: (blocked, idle, missed), fed at ``finished``."""
        if non_blocking:
            if self.needed_at is not None:  # late: the wait it would have cost at staleness 1
                missed = max(0.0, self.submitted_at + compute_s - self.needed_at)
                self._observed = (0.0, 0.0, missed)
            else:
                self._observed = (0.0, max(0.0, started - self.submitted_at - compute_s), 0.0)
            self.needed_at = None
        elif for_this_step:  # collected in the step it serves (not around a checkpoint)
            if ready:
                self._observed = (0.0, max(0.0, started - self.submitted_at - compute_s), 0.0)
            else:
                self._observed = (ended - started, 0.0, 0.0)

    def forget_collect(self) -> None:
        """A collect between steps (around a checkpoint) describes no step."""
        self._observed = None

    def finished(self, step: int) -> int | None:
        """Feed the finished step; the b_p for the next job, or None when nothing was fed."""
        now = self.clock()
        observed, self._observed = self._observed, None
        answer = None
        if observed is not None and self.adapter is not None and self._last_finish is not None:
            waited, idle, missed = observed
            period = now - self._last_finish
            if period > waited:  # always, with a clock that does not go backwards
                answer = self.adapter.observe(step_time_s=period + missed, waited_s=waited + missed,
                                              worker_idle_s=idle, step=step)
        self._last_finish = now
        return answer

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.adapter is None else self.adapter.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> int | None:
        """Restore the adapter (older states have none); returns its b_p, if any."""
        if state is not None:
            adapter = BatchSizeAdapter(1, 1)
            adapter.load_state_dict(state)
            self.adapter = adapter
        # The next step's time runs from its own start, and no result collected so far is fed.
        self._observed = self.needed_at = self._last_finish = None
        return None if self.adapter is None else self.adapter.batch_size

    @property
    def trajectory(self) -> tuple[tuple[int, int], ...]:
        return () if self.adapter is None else tuple(self.adapter.trajectory)
