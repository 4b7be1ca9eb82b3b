"""Confirming the study's finalists after its trials (no torch).

Each trial is one window of steps; on a shared machine two windows of one configuration
differ by 5-10%, as much as the margin, so a choice made from single windows can follow the
noise. The finalists are measured again, in alternation (A, B, C, A, B, C, ...: a slow spell
of the machine then hits every finalist rather than one), and the choice is re-made by the
same rule (``selection.choose``) from each finalist's pooled measurement: the median over its
trial's window and every confirmation window.

The finalists: the study's choice; the cost model's trial (the enqueued first one) when it
differs and completed, hidden in its own window or not; the front point with the next larger b_p than the chosen
one, if any (the point the choice most likely lost to noise). Confirmation windows are not
Optuna trials: the study keeps what its sampler saw, and a resumed study confirms afresh.
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

from asam_tune.tune.selection import Choice, Measurement, Outcome, choose, is_within_margin

STUDY_CHOICE, COST_MODEL, LARGER_B_P = "study_choice", "cost_model", "larger_b_p"


@dataclass(frozen=True)
class Finalist:
    outcome: Outcome  # the study's trial: its configuration and its own window
    roles: tuple[str, ...]  # why it is a finalist (one configuration can be several)


@dataclass(frozen=True)
class ConfirmationRun:
    """A finalist's confirmation windows, in the order they ran; ``error`` when one failed."""

    finalist: Finalist
    rounds: tuple[Measurement, ...]
    error: str | None = None

    @property
    def number(self) -> int:
        return self.finalist.outcome.number

    @property
    def pooled(self) -> Measurement | None:
        """None for a failed confirmation: the finalist is dropped, not judged on fewer windows."""
        if self.error is not None:
            return None
        return pool((self.finalist.outcome.measurement, *self.rounds))

    def outcome(self) -> Outcome:
        """The trial as the re-made choice sees it: its pooled measurement."""
        return replace(self.finalist.outcome, measurement=self.pooled)


@dataclass(frozen=True)
class Confirmation:
    rounds: int  # rounds asked for
    runs: tuple[ConfirmationRun, ...]  # one per finalist, in the order they alternated
    study_choice: Choice  # from the single windows
    choice: Choice  # re-made from the pooled windows (or the study's, when none could be: confirmed False)
    confirmed: bool

    @property
    def changed(self) -> bool:
        return self.choice.outcome.number != self.study_choice.outcome.number

    def pooled(self) -> dict[int, Measurement]:
        """Trial number -> pooled measurement, for the finalists that were confirmed."""
        return {run.number: run.pooled for run in self.runs if run.error is None}


def pool(windows: Sequence[Measurement]) -> Measurement:
    """Medians over the windows' medians (and IQRs); the steps add up."""
    def median(field: str) -> float:
        return statistics.median(getattr(w, field) for w in windows)

    return Measurement(step_time_s=median("step_time_s"), step_time_iqr_s=median("step_time_iqr_s"),
                       wait_s=median("wait_s"), worker_time_s=median("worker_time_s"),
                       steps=sum(w.steps for w in windows))


def finalists(outcomes: Sequence[Outcome], front: Sequence[Outcome], choice: Choice, planned_trial: int | None,
              margin: float) -> list[Finalist]:
    """The study's choice first, then the cost model's trial, then the next larger b_p on the front.

    Two trials of the same configuration are one finalist (measuring it twice per round would
    only weigh it double); it keeps the earlier role's trial.
    """
    chosen = choice.outcome
    if chosen is None:
        return []
    candidates: list[tuple[Outcome, str]] = [(chosen, STUDY_CHOICE)]
    planned = next((o for o in outcomes if o.number == planned_trial), None)
    if planned is not None and planned.complete:
        # Even when its own window was late: the plan is what a user runs without tuning, and one
        # late window is the kind of noise confirmation exists for (pooling re-judges it).
        candidates.append((planned, COST_MODEL))
    larger = [o for o in front if o.config.perturbation_batch_size > chosen.config.perturbation_batch_size]
    if larger:
        candidates.append((min(larger, key=lambda o: (o.config.perturbation_batch_size, o.number)), LARGER_B_P))
    picked: dict[object, Finalist] = {}
    for outcome, role in candidates:
        same = picked.get(outcome.config)
        picked[outcome.config] = (Finalist(outcome, (role,)) if same is None
                                  else Finalist(same.outcome, same.roles + (role,)))
    return list(picked.values())


def rechoose(study_choice: Choice, runs: Sequence[ConfirmationRun], rounds: int, sgd_step_s: float,
             margin: float) -> Confirmation:
    """The choice by ``selection.choose`` over the confirmed finalists' pooled measurements.

    When no finalist survives (every confirmation failed, or none hid the perturbation once
    pooled) the study's choice stands, unconfirmed, and the reason says so: the other trials
    were never re-measured, so nothing better is known.
    """
    survivors = [run.outcome() for run in runs if run.error is None]
    remade = choose(survivors, sgd_step_s, margin)
    if remade.outcome is not None:
        reason = (f"{remade.reason}, judged on medians pooled over the trial and {rounds} confirmation round(s) "
                  f"of {len(runs)} finalist(s)")
        return Confirmation(rounds, tuple(runs), study_choice, replace(remade, reason=reason), True)
    chosen = study_choice.outcome
    own = next((run for run in runs if run.number == chosen.number and run.error is None), None)
    outcome = own.outcome() if own is not None else chosen  # its best-known numbers
    why = "no finalist hid the perturbation once pooled" if survivors else "every finalist's confirmation failed"
    reason = f"{study_choice.reason}; not confirmed ({why}): the study's choice stands on its trial"
    choice = Choice(outcome, is_within_margin(outcome.measurement, sgd_step_s, margin), reason)
    return Confirmation(rounds, tuple(runs), study_choice, choice, False)
