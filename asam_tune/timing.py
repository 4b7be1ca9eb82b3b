"""Honest timing of one operation: warm-up, synchronise inside the timer, repeat, keep samples.

No torch import: the device's ``sync`` is handed in, and so is the clock, so that the
profiler is unit-tested with a fake clock whose time moves only when a fake device says so.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from asam_tune.errors import UserInputError
from asam_tune.records.profile import TimingStats

# A sample is never recorded as 0 s (records require positive times): an operation faster than
# the clock can resolve is stored as this, which is far below anything a device step takes.
MIN_SAMPLE_S = 1e-9


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic time in seconds."""
        ...


class PerfClock:
    """The real clock: ``time.perf_counter``."""

    def now(self) -> float:
        return time.perf_counter()


class FakeClock:
    """A clock that moves only when told to (fake devices advance it by their fake work)."""

    def __init__(self, start: float = 0.0):
        self._t = float(start)

    def now(self) -> float:
        return self._t

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock cannot go back: advance({seconds!r})")
        self._t += seconds


@dataclass(frozen=True)
class MeasureSettings:
    """How long and how often one operation is timed."""

    warmup: int = 2  # untimed runs first: kernel choice, allocator, caches
    min_time_s: float = 0.5  # keep repeating until the timed samples add up to this ...
    min_repeats: int = 5  # ... and at least this many samples were taken ...
    max_repeats: int = 50  # ... but never more than this many
    noise_threshold: float = 0.1  # a point is noisy when iqr / median exceeds this

    def __post_init__(self) -> None:
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise UserInputError(f"warmup must be a non-negative integer, got {self.warmup!r}")
        if not self.min_time_s > 0:
            raise UserInputError(f"min_time_s must be positive, got {self.min_time_s!r}")
        if isinstance(self.min_repeats, bool) or not isinstance(self.min_repeats, int) or self.min_repeats < 1:
            raise UserInputError(f"min_repeats must be a positive integer, got {self.min_repeats!r}")
        if not isinstance(self.max_repeats, int) or self.max_repeats < self.min_repeats:
            raise UserInputError(f"max_repeats must be an integer >= min_repeats ({self.min_repeats}), "
                                 f"got {self.max_repeats!r}")
        if not self.noise_threshold > 0:
            raise UserInputError(f"noise_threshold must be positive, got {self.noise_threshold!r}")


def summarize(samples: Sequence[float], noise_threshold: float) -> TimingStats:
    """Median, interquartile range and the noisy flag of raw samples (seconds)."""
    if not samples:
        raise ValueError("no samples to summarize")
    kept = tuple(max(float(s), MIN_SAMPLE_S) for s in samples)
    median = statistics.median(kept)
    if len(kept) >= 2:
        # 'inclusive' is linear interpolation between order statistics, as numpy's default.
        q1, _, q3 = statistics.quantiles(kept, n=4, method="inclusive")
        iqr = max(q3 - q1, 0.0)
    else:
        iqr = 0.0
    return TimingStats(median_s=median, iqr_s=iqr, samples_s=kept, noisy=iqr / median > noise_threshold)


def measure(run: Callable[[], object], *, sync: Callable[[], object], clock: Clock,
            warmup: int, min_time_s: float, min_repeats: int, max_repeats: int,
            noise_threshold: float) -> TimingStats:
    """Time ``run`` until the samples add up to ``min_time_s`` and there are ``min_repeats``.

    Each sample is ``run(); sync()`` between two clock readings: the device finishes the work
    inside the timer (an asynchronous device would otherwise be timed at its launch cost). A
    ``sync`` before each sample keeps earlier queued work out of it.
    """
    settings = MeasureSettings(warmup, min_time_s, min_repeats, max_repeats, noise_threshold)
    for _ in range(settings.warmup):
        run()
    sync()

    def sample() -> float:
        sync()
        start = clock.now()
        run()
        sync()
        return clock.now() - start

    return repeat_samples(sample, settings)


def repeat_samples(sample: Callable[[], float], settings: MeasureSettings) -> TimingStats:
    """Call ``sample`` (it returns the seconds it timed) until ``settings`` are met; no warm-up.

    For operations that time only part of what they do (e.g. a wait between two timed parts).
    """
    samples: list[float] = []
    total = 0.0
    while len(samples) < settings.max_repeats and (len(samples) < settings.min_repeats
                                                  or total < settings.min_time_s):
        elapsed = sample()
        samples.append(elapsed)
        total += elapsed
    return summarize(samples, settings.noise_threshold)


def measure_with(run: Callable[[], object], *, sync: Callable[[], object], clock: Clock,
                 settings: MeasureSettings) -> TimingStats:
    """``measure`` with the knobs taken from a ``MeasureSettings``."""
    return measure(run, sync=sync, clock=clock, warmup=settings.warmup, min_time_s=settings.min_time_s,
                   min_repeats=settings.min_repeats, max_repeats=settings.max_repeats,
                   noise_threshold=settings.noise_threshold)


__all__ = ["Clock", "PerfClock", "FakeClock", "MeasureSettings", "measure", "measure_with",
           "repeat_samples", "summarize", "MIN_SAMPLE_S"]
