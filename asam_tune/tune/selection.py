"""Judging measured trials: the constraint, the Pareto front and the chosen point (no torch).

- Constraint (Optuna's, <= 0 is feasible): ``wait - margin * step``; the perturbation is hidden
  when the main device waited at most ``margin`` of its step for the worker.
- Objectives: step time (minimise) and b_p (maximise); the front is taken over hidden trials.
- Chosen: the largest b_p among hidden trials whose step is within ``margin`` of SGD's (ties:
  the faster step, then the earlier trial). When none is, the fastest hidden step is the best
  this machine reaches, and the choice is the largest b_p within ``margin`` of *that* step:
  trials whose steps differ by less than the margin differ by noise, not by b_p (on a 2-core VM
  every b_p from 6 to 121 of resnet20 measured 520-577 ms), so the fastest one alone would be a
  lottery that favours tiny b_p. Said so in the reason.
"""
from __future__ import annotations

from dataclasses import dataclass

from asam_tune.tune.space import TrialConfig


@dataclass(frozen=True)
class Measurement:
    """A trial's window of asynchronous-SAM steps (seconds; medians over the timed steps)."""

    step_time_s: float
    step_time_iqr_s: float
    wait_s: float  # the main device's wait for the worker, per step
    worker_time_s: float  # one job on the worker
    steps: int


@dataclass(frozen=True)
class Outcome:
    """A finished (or failed) trial as the selection sees it."""

    number: int
    state: str  # 'complete', 'fail', ... (Optuna's state, lower case)
    config: TrialConfig | None
    measurement: Measurement | None = None
    error: str | None = None
    from_cost_model: bool = False

    @property
    def complete(self) -> bool:
        return self.state == "complete" and self.measurement is not None and self.config is not None


def wait_excess_s(m: Measurement, margin: float) -> float:
    """Optuna's constraint value: how much longer than allowed the main device waited."""
    return m.wait_s - margin * m.step_time_s


def is_hidden(m: Measurement, margin: float) -> bool:
    return wait_excess_s(m, margin) <= 0


def is_within_margin(m: Measurement, sgd_step_s: float, margin: float) -> bool:
    return m.step_time_s <= (1 + margin) * sgd_step_s


def _dominates(a: Outcome, b: Outcome) -> bool:
    """a is no slower with no smaller b_p, and strictly better in one (Optuna's definition)."""
    ta, tb = a.measurement.step_time_s, b.measurement.step_time_s
    pa, pb = a.config.perturbation_batch_size, b.config.perturbation_batch_size
    return ta <= tb and pa >= pb and (ta < tb or pa > pb)


def pareto_front(outcomes: list[Outcome], margin: float) -> list[Outcome]:
    """Hidden complete trials that no other hidden trial dominates, by b_p then step time."""
    hidden = [o for o in outcomes if o.complete and is_hidden(o.measurement, margin)]
    front = [o for o in hidden if not any(_dominates(other, o) for other in hidden)]
    return sorted(front, key=lambda o: (o.config.perturbation_batch_size, o.measurement.step_time_s, o.number))


@dataclass(frozen=True)
class Choice:
    outcome: Outcome | None
    within_margin: bool
    reason: str


def choose(outcomes: list[Outcome], sgd_step_s: float, margin: float) -> Choice:
    hidden = [o for o in outcomes if o.complete and is_hidden(o.measurement, margin)]
    within = [o for o in hidden if is_within_margin(o.measurement, sgd_step_s, margin)]
    if within:
        best = min(within, key=lambda o: (-o.config.perturbation_batch_size, o.measurement.step_time_s, o.number))
        return Choice(best, True, f"the largest b_p whose step is within {margin:.0%} of SGD's")
    if hidden:
        fastest = min(o.measurement.step_time_s for o in hidden)
        near = [o for o in hidden if is_within_margin(o.measurement, fastest, margin)]
        best = min(near, key=lambda o: (-o.config.perturbation_batch_size, o.measurement.step_time_s, o.number))
        return Choice(best, False, f"no hidden configuration came within {margin:.0%} of SGD's step: the largest "
                                   f"b_p within {margin:.0%} of the fastest hidden step ({fastest * 1e3:.3g} ms)")
    completed = sum(o.complete for o in outcomes)
    failed = sum(o.state == "fail" for o in outcomes)
    return Choice(None, False, f"no trial hid the perturbation ({completed} completed, {failed} failed)")
