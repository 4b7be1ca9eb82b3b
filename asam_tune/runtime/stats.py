"""What ``AsyncSAM`` measured about its worker: waits, worker time, staleness, skips, fallbacks, b_p.

``StatsRecorder`` is the mutable counter the runtime updates; ``AsyncSAMStats`` is the frozen
snapshot ``AsyncSAM.stats()`` hands out. Medians are taken over the last ``WINDOW`` steps so
that a long run keeps bounded memory; counts and the total wait cover the whole run (a resumed
run included: the recorder is part of ``AsyncSAM.state_dict()``).
"""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from asam_tune.errors import UserInputError

# Steps kept for the medians: enough for a stable median, small enough to checkpoint.
WINDOW = 4096


@dataclass(frozen=True)
class AsyncSAMStats:
    steps: int  # optimizer steps finished (finish_step() calls)
    # Seconds the main process spent handing jobs to the worker and waiting for results.
    wait_total_s: float
    wait_median_s: float  # per step, over the last WINDOW steps; 0.0 before the first step
    worker_compute_median_s: float  # worker-side time of one job, over the last WINDOW jobs
    # staleness actually applied (step - step of the weights the perturbation came from) -> steps
    staleness_histogram: dict[int, int] = field(default_factory=dict)
    skipped_perturbations: int = 0  # steps whose perturbation was not finite (descent unperturbed)
    fallbacks: int = 0  # worker failures survived by switching to synchronous SAM
    perturbation_batch_size: int | None = None  # b_p; None = the whole batch
    # Online adaptation (runtime/adaptation.py): (step, b_p) pairs, the first being the start;
    # a b_p set after step t is used from the job handed to the worker in step t + 1.
    # Empty when adaptation is off.
    perturbation_batch_size_trajectory: tuple[tuple[int, int], ...] = ()
    # The rho of the last job handed to the worker: the user's rho after the rho rule for the
    # b_p in use (runtime/options.py); None before the first job.
    rho_applied: float | None = None


def _median(samples: deque[float]) -> float:
    return statistics.median(samples) if samples else 0.0


class StatsRecorder:
    """Accumulates one run's measurements; waits inside a step add up until ``end_step``."""

    def __init__(self) -> None:
        self.steps = 0
        self.wait_total_s = 0.0
        self.skipped = 0
        self.fallbacks = 0
        self.staleness: dict[int, int] = {}
        self._step_waits: deque[float] = deque(maxlen=WINDOW)
        self._compute_times: deque[float] = deque(maxlen=WINDOW)
        self._current_wait = 0.0
        self.rho_applied: float | None = None

    def add_wait(self, seconds: float) -> None:
        self._current_wait += seconds
        self.wait_total_s += seconds

    def add_compute(self, seconds: float) -> None:
        self._compute_times.append(seconds)

    def add_applied(self, staleness: int) -> None:
        self.staleness[staleness] = self.staleness.get(staleness, 0) + 1

    def end_step(self) -> None:
        self._step_waits.append(self._current_wait)
        self._current_wait = 0.0
        self.steps += 1

    def snapshot(self, perturbation_batch_size: int | None,
                 trajectory: tuple[tuple[int, int], ...] = ()) -> AsyncSAMStats:
        return AsyncSAMStats(
            steps=self.steps,
            wait_total_s=self.wait_total_s,
            wait_median_s=_median(self._step_waits),
            worker_compute_median_s=_median(self._compute_times),
            staleness_histogram=dict(sorted(self.staleness.items())),
            skipped_perturbations=self.skipped,
            fallbacks=self.fallbacks,
            perturbation_batch_size=perturbation_batch_size,
            perturbation_batch_size_trajectory=trajectory,
            rho_applied=self.rho_applied,
        )

    def state_dict(self) -> dict[str, Any]:
        # Plain Python numbers only: loads under torch.load(weights_only=True).
        return {
            "steps": self.steps,
            "wait_total_s": self.wait_total_s,
            "skipped": self.skipped,
            "fallbacks": self.fallbacks,
            "staleness": dict(self.staleness),
            "step_waits": list(self._step_waits),
            "compute_times": list(self._compute_times),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            steps = int(state["steps"])
            wait_total = float(state["wait_total_s"])
            skipped = int(state["skipped"])
            fallbacks = int(state["fallbacks"])
            staleness = {int(k): int(v) for k, v in state["staleness"].items()}
            step_waits = [float(v) for v in state["step_waits"]]
            compute_times = [float(v) for v in state["compute_times"]]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserInputError(f"invalid AsyncSAM stats state: {exc!r}") from None
        self.steps, self.wait_total_s, self.skipped, self.fallbacks = steps, wait_total, skipped, fallbacks
        self.staleness = staleness
        self._step_waits = deque(step_waits, maxlen=WINDOW)
        self._compute_times = deque(compute_times, maxlen=WINDOW)
        self._current_wait = 0.0


class TimelineRecorder:
    """Start and end of every main step, handover, wait and worker job, for a timeline plot.

    Times are ``time.perf_counter()`` seconds: the CPU worker's clock too (one system-wide
    monotonic clock on Linux), so its jobs line up with the main steps. Bounded: the first
    ``limit`` events are kept.
    """

    KINDS = ("main_step", "handover", "wait", "ascent")

    def __init__(self, limit: int = 100_000):
        self.limit = limit
        self._events: list[dict[str, Any]] = []

    def add(self, kind: str, step: int, start_s: float | None, end_s: float | None) -> None:
        if start_s is None or end_s is None or len(self._events) >= self.limit:
            return
        self._events.append({"kind": kind, "step": step, "start_s": start_s, "end_s": end_s})

    def events(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self._events]
