"""The tuning record: what ``asam-tune tune`` measured, beside what the plan predicted (no torch).

Layout (schema_version 1)::

    Tuning
      workload, batch_size, main_device, margin   what was tuned (from the source plan)
      source_plan_hash, tuned_plan_hash           the plan it started from, the plan it wrote
      study_name, storage                         where the Optuna study lives (resumable)
      steps_per_trial, warmup_steps               how long each trial measured
      baseline                                    SGD and synchronous SAM, measured once per study
      predicted                                   the source plan's predictions
      planned_trial, chosen_trial                 trial numbers: the cost model's choice, the winner
      verdict                                     one plain-language sentence
      trials[]                                    every trial: its configuration and measurements

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
        return self

    def trial(self, number: int | None) -> TrialLog | None:
        return None if number is None else next((t for t in self.trials if t.number == number), None)


__all__ = ["MeasuredBaseline", "TUNING_KIND", "TrialLog", "TrialState", "Tuning"]
