"""How long one trial times (no torch): at least ``steps`` steps AND at least ``min_seconds``.

A fixed count of steps is a fixed count, not a fixed amount of evidence: 20 steps of the
MNIST-1D CNN are 0.1 s of timing, and on a shared 2-vCPU machine the median of such a
window moved 5-10% between two trials of one configuration, as much as the margin. So a
trial also keeps timing until ``min_seconds`` of timed steps have passed, up to a hard cap on
the number of steps (``MAX_STEPS_FACTOR`` x ``steps``), so that a clock that never advances
cannot loop forever.

``timed_batches`` is the loader the timing loops of ``asam_tune.steptiming`` iterate over: it
cycles the few synthetic batches (no new batch is allocated) and ends when the window is long
enough. The loops stay steptiming's own; only their loader decides when to stop.
"""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from asam_tune.errors import UserInputError

MAX_STEPS_FACTOR = 50  # the cap on timed steps, as a multiple of --steps-per-trial
MIN_STEPS = 3  # fewer timed steps have no meaningful median

T = TypeVar("T")


@dataclass(frozen=True)
class TrialLength:
    """``warmup`` untimed steps, then at least ``steps`` timed ones lasting at least
    ``min_seconds`` in all (0: exactly ``steps``), never more than ``max_steps``."""

    steps: int
    warmup: int = 0
    min_seconds: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < MIN_STEPS:
            raise UserInputError(f"Invalid steps per trial: {self.steps!r} (need at least {MIN_STEPS} timed steps)")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise UserInputError(f"Invalid warm-up steps: {self.warmup!r} (expected >= 0)")
        if not (isinstance(self.min_seconds, (int, float)) and math.isfinite(self.min_seconds)
                and self.min_seconds >= 0):
            raise UserInputError(f"Invalid minimum trial seconds: {self.min_seconds!r} (expected a number >= 0)")

    @property
    def max_steps(self) -> int:
        return MAX_STEPS_FACTOR * self.steps


def timed_batches(batches: Sequence[T], length: TrialLength,
                  clock: Callable[[], float] = time.perf_counter) -> Iterator[T]:
    """Cycle ``batches``: ``length.warmup`` of them, then timed ones until the window is long enough.

    The clock starts when the first timed batch is taken and is read as each further one is
    taken, i.e. as each timed step ends: the timed steps then last at least ``min_seconds``. A
    loop that peeks one batch ahead (``AsyncSAM.lookahead``) takes every batch one step early,
    so its clock starts one warm-up step early and stops one timed step early: the same length
    give or take the difference of two steps.
    """
    if not batches:
        raise ValueError("no batches to cycle")
    source = itertools.cycle(batches)
    for _ in range(length.warmup):
        yield next(source)
    started = clock()
    for taken in range(length.max_steps):
        if taken >= length.steps and clock() - started >= length.min_seconds:
            return
        yield next(source)
