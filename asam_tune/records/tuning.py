"""The tuning record: what ``asam-tune tune`` measured, beside what the plan predicted (no torch).

Layout (schema_version 1)::

    Tuning
      workload, batch_size, main_device, margin   what was tuned (from the source plan)
      source_plan_hash, tuned_plan_hash           the plan it started from, the plan it wrote
      study_name, storage                         where the Optuna study lives (resumable)
      steps_per_trial, warmup_steps               how long each trial measured
      min_trial_seconds                           ... and at least this long (optional: newer)
      confirm_rounds, confirmation[]              the finalists re-measured after the trials (optional: newer)
      baseline                                    SGD and synchronous SAM, measured once per study
      predicted                                   the source plan's predictions
      planned_trial, chosen_trial                 trial numbers: the cost model's choice, the winner
      verdict                                     one plain-language sentence
      trials[]                                    every trial: its configuration and measurements

The optional fields came after the first records were written: they are left out of the
document while unset (``omit_when_none``), so an older record loads, is written back and is
hashed exactly as it was.

A trial's perturbation is a device label: ``cpu`` (a worker process), ``cuda:N`` (another GPU)
or ``cuda:N+stream`` (a second stream of the main GPU).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from asam_tune.records.base import Record
from asam_tune.records.plan import Predictions
from asam_tune.records.profile import WorkloadDescriptor

TUNING_SCHEMA_VERSION = 1
TUNING_KIND = "asam-tune-tuning"

TrialState = Literal["complete", "fail", "pruned", "running", "waiting"]


class TrialLog(Record):
    """One Optuna trial: the configuration it ran and what it measured (medians, seconds)."""

    number: NonNegativeInt
    state: TrialState
    from_cost_model: bool = False  # the enqueued first trial
    perturbation: str | None = Field(default=None, pattern=r"^(cpu|cuda:\d+(\+stream)?)$")
    main_threads: PositiveInt | None = None  # a CPU main process's threads
    worker_threads: PositiveInt | None = None  # a CPU worker's threads
    perturbation_batch_size: PositiveInt | None = None
    step_time_s: PositiveFloat | None = None
    step_time_iqr_s: NonNegativeFloat | None = None
    wait_s: NonNegativeFloat | None = None  # the main device's wait for the worker, per step
    worker_time_s: NonNegativeFloat | None = None  # one job on the worker
    hidden: bool | None = None  # wait <= margin * step: the constraint
    within_margin: bool | None = None  # step <= (1 + margin) * SGD's step
    pareto: bool = False  # on the front of (step time, b_p) among hidden trials
    error: str | None = None
    steps: PositiveInt | None = None  # timed steps in the window (a time-based window varies)

    omit_when_none = frozenset({"steps"})

    @model_validator(mode="after")
    def _complete_has_measurements(self) -> "TrialLog":
        measured = (self.step_time_s, self.wait_s, self.worker_time_s, self.hidden, self.within_margin)
        if self.state == "complete" and any(v is None for v in measured):
            raise ValueError("a complete trial needs step_time_s, wait_s, worker_time_s, hidden and within_margin")
        if self.state == "fail" and not self.error:
            raise ValueError("a failed trial needs its error")
        if self.pareto and not self.hidden:
            raise ValueError("only hidden trials are on the Pareto front")
        return self


FinalistRole = Literal["study_choice", "cost_model", "larger_b_p"]


class ConfirmationRound(Record):
    """One more window of a finalist's configuration, timed as a trial is (medians, seconds)."""

    step_time_s: PositiveFloat
    step_time_iqr_s: NonNegativeFloat
    wait_s: NonNegativeFloat
    worker_time_s: NonNegativeFloat
    steps: PositiveInt


class ConfirmationLog(Record):
    """A finalist re-measured after the study's trials, in alternation with the others.

    Why a finalist: the study's choice, the cost model's (enqueued) trial, the front point with
    the next larger b_p. Pooled values are medians over the trial's window and every round's
    (the steps, summed); they replace the trial's own when the choice is re-made. A finalist
    whose confirmation failed has its error and no pooled values: it was dropped.
    """

    trial: NonNegativeInt  # the trial whose configuration this confirms
    roles: tuple[FinalistRole, ...] = Field(min_length=1)
    perturbation: str = Field(pattern=r"^(cpu|cuda:\d+(\+stream)?)$")
    main_threads: PositiveInt | None = None
    worker_threads: PositiveInt | None = None
    perturbation_batch_size: PositiveInt
    rounds: tuple[ConfirmationRound, ...] = ()
    step_time_s: PositiveFloat | None = None  # pooled
    step_time_iqr_s: NonNegativeFloat | None = None  # pooled (median of the windows' IQRs)
    wait_s: NonNegativeFloat | None = None  # pooled
    worker_time_s: NonNegativeFloat | None = None  # pooled
    steps: PositiveInt | None = None  # timed steps in all the windows
    hidden: bool | None = None  # pooled wait <= margin * pooled step
    within_margin: bool | None = None  # pooled step <= (1 + margin) * SGD's step
    error: str | None = None

    @model_validator(mode="after")
    def _pooled_unless_failed(self) -> "ConfirmationLog":
        pooled = (self.step_time_s, self.wait_s, self.worker_time_s, self.hidden, self.within_margin)
        if self.error is None and any(v is None for v in pooled):
            raise ValueError("a confirmed finalist needs step_time_s, wait_s, worker_time_s, hidden and within_margin")
        if self.error is not None and any(v is not None for v in pooled):
            raise ValueError("a failed confirmation has no pooled values")
        return self


class MeasuredBaseline(Record):
    """SGD and synchronous SAM, measured once at the start of the study in the same process."""

    sgd_step_s: PositiveFloat
    sam_step_s: PositiveFloat
    placement: str  # where they ran, in words: 'cpu on cores 0,1 (2 threads)'


class Tuning(Record):
    """The outcome of one ``asam-tune tune`` run (all trials of the study so far)."""

    schema_version: Literal[1] = TUNING_SCHEMA_VERSION
    kind: Literal["asam-tune-tuning"] = TUNING_KIND
    created_at: str
    asam_tune_version: str
    workload: WorkloadDescriptor
    batch_size: PositiveInt
    main_device: str
    margin: float = Field(ge=0.0, lt=1.0)
    source_plan_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    tuned_plan_hash: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    study_name: str
    storage: str
    steps_per_trial: PositiveInt
    warmup_steps: NonNegativeInt
    baseline: MeasuredBaseline
    predicted: Predictions
    planned_trial: NonNegativeInt | None = None
    chosen_trial: NonNegativeInt | None = None
    verdict: str
    trials: tuple[TrialLog, ...] = ()
    min_trial_seconds: NonNegativeFloat | None = None
    confirm_rounds: NonNegativeInt | None = None
    confirmation: tuple[ConfirmationLog, ...] | None = None

    omit_when_none = frozenset({"min_trial_seconds", "confirm_rounds", "confirmation"})

    @model_validator(mode="after")
    def _references_exist(self) -> "Tuning":
        numbers = {t.number: t for t in self.trials}
        if len(numbers) != len(self.trials):
            raise ValueError("trial numbers repeat")
        for name in ("planned_trial", "chosen_trial"):
            number = getattr(self, name)
            if number is not None and number not in numbers:
                raise ValueError(f"{name} {number} is not among the trials")
        if self.chosen_trial is not None and not numbers[self.chosen_trial].hidden:
            raise ValueError(f"chosen trial {self.chosen_trial} did not hide the perturbation")
        if (self.chosen_trial is None) != (self.tuned_plan_hash is None):
            raise ValueError("a tuned plan goes with a chosen trial")
        confirmed = [c.trial for c in self.confirmation or ()]
        if len(set(confirmed)) != len(confirmed):
            raise ValueError("a trial is confirmed twice")
        missing = [n for n in confirmed if n not in numbers]
        if missing:
            raise ValueError(f"confirmation of trial {missing[0]}, which is not among the trials")
        return self

    def confirmed(self, number: int | None) -> ConfirmationLog | None:
        """The trial's confirmation, when it was a finalist and its confirmation succeeded."""
        return next((c for c in self.confirmation or () if c.trial == number and c.error is None), None)

    def trial(self, number: int | None) -> TrialLog | None:
        return None if number is None else next((t for t in self.trials if t.number == number), None)


__all__ = ["ConfirmationLog", "ConfirmationRound", "FinalistRole", "MeasuredBaseline", "TUNING_KIND", "TrialLog",
           "TrialState", "Tuning"]
