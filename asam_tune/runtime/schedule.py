"""Which perturbation serves which step: the results held by step, and the one job in flight.

At staleness 1 the job handed over in step t serves step t + 1; at staleness 0 a job serves
the step it was made in; in non-blocking mode a step takes the newest result made for it or
an earlier step. A collected result's tensors may be the worker's reusable output buffers
(ProcessPerturber's are valid until its next collect), so the last one collected is copied
before the next collect if it is still needed then. In steady state it never is: no copy per
step.
"""
from __future__ import annotations

from asam_tune.perturbers.base import PerturbationResult

__all__ = ["PerturbationSchedule"]


class PerturbationSchedule:
    def __init__(self) -> None:
        self.held: dict[int, PerturbationResult] = {}  # collected results by the step they serve
        self.inflight: int | None = None  # the step the worker's current job serves
        self.inflight_ahead = False  # the job in flight serves a later step than the one it was made in
        self._borrowed: PerturbationResult | None = None

    def launched(self, serves_step: int, current_step: int) -> None:
        self.inflight = serves_step
        self.inflight_ahead = serves_step > current_step

    def landed(self) -> int:
        """The job in flight is being collected: the step it serves."""
        serves, self.inflight = self.inflight, None
        return serves

    def hold(self, serves_step: int, result: PerturbationResult) -> None:
        self.held[serves_step] = result
        self._borrowed = result if result.perturbation is not None else None

    def lookup(self, step: int, non_blocking: bool) -> PerturbationResult | None:
        if not non_blocking:
            return self.held.get(step)
        usable = [target for target in self.held if target <= step]
        return self.held[max(usable)] if usable else None

    def prune(self, step: int, non_blocking: bool) -> None:
        """Drop results no later step can use."""
        if non_blocking:
            usable = [target for target in self.held if target <= step]
            floor = max(usable) if usable else step
        else:
            floor = step
        for target in [t for t in self.held if t < floor]:
            del self.held[target]

    def own_borrowed(self, current: PerturbationResult | None) -> None:
        """Before a collect: copy the last collected result out of the worker's buffers if still needed."""
        borrowed, self._borrowed = self._borrowed, None
        if borrowed is None:
            return
        if borrowed is current or any(r is borrowed for r in self.held.values()):
            borrowed.perturbation = [t.clone() for t in borrowed.perturbation]

    def clear(self) -> None:
        self.held.clear()
        self.inflight = None
        self._borrowed = None
