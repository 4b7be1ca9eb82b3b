"""Online b_p adaptation: keep the perturbation hidden when the machine changes (no torch).

``BatchSizeAdapter`` is fed one observation per finished step and answers the perturbation
batch size ``b_p`` for the next job handed to the worker::

    adapter = BatchSizeAdapter(initial=plan.perturbation_batch_size, bound=plan.batch_size)
    b_p = adapter.observe(step_time_s=..., waited_s=..., worker_idle_s=...)

An observation splits the main step into its own compute ``c = step_time_s - waited_s`` and
the time it waited for the worker. If the worker's time grows linearly with ``b_p`` (it does,
past the smallest batches), the ``b_p`` that keeps it busy ``target_share`` of ``c`` is
``b_p * target_share * c / busy``, where ``busy`` is ``c + waited`` for a late worker and
``c - idle`` for an idle one. That is the size of each change. When to change:

- shrink when more than ``late_fraction`` of the last ``window`` steps were late (the main
  device waited longer than ``late_tolerance`` of its step);
- grow when a full window had no late step and the worker idled at least
  ``grow_idle_share`` of the main compute (median); at most ``max_growth`` times per change;
- after each change, ignore ``cooldown`` steps (the first job at the new size is collected
  one step later) and start a fresh window;
- a size that was late is a ceiling for ``ceiling_ttl`` steps: growth stops one below it.

The gap between the two triggers (a sized worker idles ``1 - target_share`` < ``grow_idle_share``
of the step) and the ceiling are the hysteresis: under noise the size does not flip back and
forth. Every change is logged (logger ``asam_tune.runtime.adaptation``) and kept in
``trajectory``.
"""
from __future__ import annotations

import logging
import math
import numbers
import statistics
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from asam_tune.errors import UserInputError

__all__ = ["AdaptationSettings", "BatchSizeAdapter", "Observation"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdaptationSettings:
    """How eagerly the adapter reacts (defaults suit steps of milliseconds to seconds)."""

    window: int = 20  # W: recent steps of evidence
    late_fraction: float = 0.1  # shrink when more than this share of W steps were late
    late_tolerance: float = 0.02  # a step is late when the wait exceeds this share of it
    grow_idle_share: float = 0.2  # grow when the worker idled this share of the main compute
    target_share: float = 0.9  # size b_p so that the worker is busy this share of the main compute
    cooldown: int = 10  # K: steps ignored after a change
    max_growth: float = 2.0  # at most this factor per growth
    ceiling_ttl: int = 1000  # steps a size that was late stays out of reach

    def __post_init__(self) -> None:
        for name, least in (("window", 1), ("cooldown", 0), ("ceiling_ttl", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise UserInputError(f"Invalid {name}: {value!r} (expected an integer >= {least})")
        for name in ("late_fraction", "late_tolerance", "grow_idle_share", "target_share"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
                raise UserInputError(f"Invalid {name}: {value!r} (expected a fraction in [0, 1))")
        if self.target_share <= 0:
            raise UserInputError(f"Invalid target_share: {self.target_share!r} (expected a fraction in (0, 1))")
        if self.target_share + self.grow_idle_share <= 1:
            # A worker sized to target_share idles 1 - target_share: growing again at that idleness
            # would oscillate.
            raise UserInputError(f"grow_idle_share {self.grow_idle_share!r} must exceed 1 - target_share "
                                 f"({1 - self.target_share:.3g}), or a resized worker grows again at once")
        if (isinstance(self.max_growth, bool) or not isinstance(self.max_growth, numbers.Real)
                or not math.isfinite(self.max_growth) or self.max_growth <= 1):
            raise UserInputError(f"Invalid max_growth: {self.max_growth!r} (expected a finite number > 1)")


@dataclass(frozen=True)
class Observation:
    """One main step, as the runtime measured it (seconds)."""

    step_time_s: float  # the whole step, waits included
    waited_s: float  # blocked on the worker's result
    worker_idle_s: float  # the worker's result was ready this long before it was collected

    @property
    def compute_s(self) -> float:
        return self.step_time_s - self.waited_s


def _check_observation(step_time_s: Any, waited_s: Any, worker_idle_s: Any) -> Observation:
    values = {"step_time_s": step_time_s, "waited_s": waited_s, "worker_idle_s": worker_idle_s}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise UserInputError(f"Invalid {name}: {value!r} (expected a finite number >= 0)")
    if waited_s >= step_time_s:
        raise UserInputError(f"waited_s {waited_s!r} must be below step_time_s {step_time_s!r}")
    return Observation(float(step_time_s), float(waited_s), float(worker_idle_s))


def _check_size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UserInputError(f"Invalid {name}: {value!r} (expected an integer >= 1)")
    return int(value)


class BatchSizeAdapter:
    """Shrinks ``b_p`` when the worker is late, grows it (up to ``bound``) when it idles."""

    def __init__(self, initial: int, bound: int, settings: AdaptationSettings | None = None, *, floor: int = 1):
        self.bound = _check_size("bound", bound)
        # The plan's quality floor: below it SAM's gain is lost, so a late worker at the floor
        # makes the main step wait (partial hiding) rather than shrink b_p further.
        self.floor = min(_check_size("floor", floor), self.bound)
        initial = _check_size("initial", initial)
        if initial > self.bound:
            raise UserInputError(f"initial b_p {initial} exceeds the bound {self.bound}")
        initial = max(initial, self.floor)
        self.settings = settings or AdaptationSettings()
        self.batch_size = initial
        self.steps = 0  # observations so far
        # (step after which the size took effect, b_p): the first entry is the start.
        self.trajectory: list[tuple[int, int]] = [(0, initial)]
        self._window: deque[Observation] = deque(maxlen=self.settings.window)
        self._cooldown = 0
        self._ceiling: int | None = None  # smallest size seen late, while it lasts
        self._ceiling_until = 0
        self._warned_floor = False
        self._label = 0

    # ------------------------------------------------------------------ feeding

    def observe(self, *, step_time_s: float, waited_s: float, worker_idle_s: float, step: int | None = None) -> int:
        """Record one finished step; return the b_p for the next job.

        ``step`` labels a change in ``trajectory`` (the runtime's step number); by default the
        number of observations so far.
        """
        observation = _check_observation(step_time_s, waited_s, worker_idle_s)
        self.steps += 1
        self._label = self.steps if step is None else step
        if self._ceiling is not None and self.steps >= self._ceiling_until:
            self._ceiling = None
        if self._cooldown > 0:
            self._cooldown -= 1
            return self.batch_size
        self._window.append(observation)
        # Late: the main device waited longer than late_tolerance of its step.
        tolerance = self.settings.late_tolerance
        late = [o for o in self._window if o.waited_s > tolerance * o.step_time_s]
        if len(late) > self.settings.late_fraction * self.settings.window:
            self._shrink(late)
        elif not late and len(self._window) == self.settings.window:
            self._maybe_grow()
        return self.batch_size

    def _shrink(self, late: list[Observation]) -> None:
        b = self.batch_size
        compute = statistics.median(o.compute_s for o in late)
        waited = statistics.median(o.waited_s for o in late)
        self._ceiling = b if self._ceiling is None else min(self._ceiling, b)
        self._ceiling_until = self.steps + self.settings.ceiling_ttl
        if b <= self.floor:
            if not self._warned_floor:
                why = ("only non-blocking mode can hide it" if self.floor == 1 else
                       "the quality floor keeps b_p here: the main step waits (partial hiding)")
                logger.warning("b_p is %d and the worker is still late on %d of the last %d steps (waited "
                               "%.3g ms of %.3g ms): %s", b, len(late), len(self._window), waited * 1e3,
                               (compute + waited) * 1e3, why)
                self._warned_floor = True
            self._restart()
            return
        target = math.floor(b * self.settings.target_share * compute / (compute + waited))
        self._change(max(self.floor, min(b - 1, target)),
                     f"the worker was late on {len(late)} of the last {len(self._window)} steps "
                     f"(median wait {waited * 1e3:.3g} ms beside {compute * 1e3:.3g} ms of main compute)")

    def _maybe_grow(self) -> None:
        b = self.batch_size
        idle_share = statistics.median(o.worker_idle_s / o.compute_s for o in self._window)
        if idle_share < self.settings.grow_idle_share:
            return  # the usual case in steady state: no other median needed
        compute = statistics.median(o.compute_s for o in self._window)
        busy = statistics.median(o.compute_s - o.worker_idle_s for o in self._window)
        cap = min(self.bound, math.floor(b * self.settings.max_growth))
        if self._ceiling is not None:
            cap = min(cap, self._ceiling - 1)
        target = cap if busy <= 0 else math.floor(b * self.settings.target_share * compute / busy)
        new = min(cap, max(b + 1, target))
        if new <= b:
            return
        self._change(new, f"the worker idled {idle_share:.0%} of the main compute over the last "
                          f"{len(self._window)} steps")

    def _change(self, new: int, reason: str) -> None:
        old, self.batch_size = self.batch_size, new
        self.trajectory.append((self._label, new))
        logger.info("b_p %d -> %d after step %d: %s", old, new, self._label, reason)
        self._restart()

    def _restart(self) -> None:
        self._window.clear()
        self._cooldown = self.settings.cooldown

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values (loads under ``torch.load(weights_only=True)``)."""
        return {
            "settings": asdict(self.settings),
            "bound": self.bound,
            "floor": self.floor,
            "batch_size": self.batch_size,
            "steps": self.steps,
            "trajectory": [list(entry) for entry in self.trajectory],
            "window": [[o.step_time_s, o.waited_s, o.worker_idle_s] for o in self._window],
            "cooldown": self._cooldown,
            "ceiling": self._ceiling,
            "ceiling_until": self._ceiling_until,
            "warned_floor": self._warned_floor,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            settings = AdaptationSettings(**state["settings"])
            bound, batch_size = _check_size("bound", state["bound"]), _check_size("batch_size", state["batch_size"])
            floor = _check_size("floor", state.get("floor", 1))  # older states: no floor
            steps, cooldown = int(state["steps"]), int(state["cooldown"])
            trajectory = [(int(s), int(b)) for s, b in state["trajectory"]]
            window = [_check_observation(*entry) for entry in state["window"]]
            ceiling = None if state["ceiling"] is None else int(state["ceiling"])
            ceiling_until, warned = int(state["ceiling_until"]), bool(state["warned_floor"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserInputError(f"invalid BatchSizeAdapter state: {exc!r}") from None
        if batch_size > bound:
            raise UserInputError(f"invalid BatchSizeAdapter state: b_p {batch_size} exceeds the bound {bound}")
        self.settings, self.bound, self.batch_size, self.steps = settings, bound, batch_size, steps
        self.floor = min(floor, bound)
        self.trajectory = trajectory
        self._window = deque(window, maxlen=settings.window)
        self._cooldown, self._ceiling, self._ceiling_until = cooldown, ceiling, ceiling_until
        self._warned_floor = warned
