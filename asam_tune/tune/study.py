"""The Optuna study behind ``asam-tune tune`` (no torch: the trial runner brings it).

One study per output: stored (SQLite by default) and resumed with ``load_if_exists``; the
baseline (SGD and SAM, measured once) and the study's identity (workload, batch size, main
device, margin) are study attributes, so a resumed study judges new trials as the old ones
were judged and refuses a different problem. The cost model's choice is enqueued first
(``skip_if_exists``: once per study). A trial that raises (out of memory, a dead worker,
anything) is recorded as FAIL with its error and the study goes on.

Two objectives, step time (minimise) and b_p (maximise), with one constraint: the main
device waited at most ``margin`` of its step (``Trial.set_constraint``; on an Optuna
without it, the sampler's ``constraints_func`` reads the same value from the user attributes).

After the trials, the finalists are measured again in alternation and the choice is re-made
from the pooled windows (``confirm``); those windows are not trials and stay out of the study.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from asam_tune.errors import UserInputError
from asam_tune.tune.confirm import Confirmation, ConfirmationRun, Finalist, finalists, rechoose
from asam_tune.tune.selection import Choice, Measurement, Outcome, choose, pareto_front, wait_excess_s
from asam_tune.tune.space import SearchSpace, TrialConfig

STUDY_NAME = "asam-tune"
DIRECTIONS = ("minimize", "maximize")  # step time, b_p
CONSTRAINT = "wait_excess_s"
# Seconds between a running trial's heartbeats, and without one before it counts as dead.
HEARTBEAT_S = 10
GRACE_S = 30
_RDB_SCHEMES = ("sqlite:", "mysql", "postgresql", "oracle", "mssql")
_BASELINE_ATTR = "baseline"
_IDENTITY_ATTR = "identity"
DEFAULT_CONFIRM_ROUNDS = 2


@dataclass(frozen=True)
class Baseline:
    sgd_step_s: float
    sam_step_s: float
    placement: str  # in words, for the record


class TrialRunner(Protocol):
    """Measures configurations on the user's workload (``trial.WorkloadTrialRunner``, or a fake)."""

    def baseline(self) -> Baseline: ...

    def run(self, config: TrialConfig) -> Measurement: ...


@dataclass(frozen=True)
class StudyResult:
    baseline: Baseline
    outcomes: list[Outcome]  # every trial of the study, old ones included
    front: list[Outcome]
    choice: Choice
    planned_trial: int | None
    new_trials: int
    storage: str
    study_name: str
    confirmation: Confirmation | None = None  # None: not asked for, or no choice to confirm


def describe_error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def outcome_of(trial: Any) -> Outcome:
    """An Optuna FrozenTrial as the selection sees it."""
    params, attrs = trial.params, trial.user_attrs
    config = None
    if "perturbation" in params and "perturbation_batch_size" in params:
        config = TrialConfig(params["perturbation"], params.get("main_threads"), params.get("worker_threads"),
                             int(params["perturbation_batch_size"]))
    measurement = Measurement(**attrs["measurement"]) if "measurement" in attrs else None
    return Outcome(trial.number, trial.state.name.lower(), config, measurement, attrs.get("error"),
                   bool(attrs.get("from_cost_model", False)))


def _check_measurement(m: Measurement) -> None:
    values = (m.step_time_s, m.step_time_iqr_s, m.wait_s, m.worker_time_s)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values) or m.step_time_s <= 0:
        raise ValueError(f"the trial measured invalid times: {m}")


@contextlib.contextmanager
def _optuna_quiet() -> Iterator[Any]:
    """Optuna's per-trial log lines (and failure tracebacks) stay out of the user's terminal."""
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield optuna
    finally:
        optuna.logging.set_verbosity(before)


def _native_constraints(optuna: Any) -> bool:
    return hasattr(optuna.trial.Trial, "set_constraint")


def _constraints_from_user_attrs(trial: Any) -> tuple[float, ...]:
    """Older Optuna: the sampler asks for the constraint after each trial."""
    return (float(trial.user_attrs.get(CONSTRAINT, math.inf)),)


def _sampler(optuna: Any, seed: int | None) -> Any:
    if _native_constraints(optuna):
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, constraints_func=_constraints_from_user_attrs)


def _storage(optuna: Any, url: str | None) -> Any:
    """A database storage with a heartbeat: a trial whose process was killed is marked FAIL on
    the next run instead of staying RUNNING forever."""
    if url is None or not url.startswith(_RDB_SCHEMES):
        return url
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat's
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    except Exception as exc:  # SQLAlchemy's errors for a bad URL or an unwritable file
        raise UserInputError(f"cannot open the study storage {url!r}: {describe_error(exc)}") from None


def _check_identity(study: Any, identity: dict[str, Any], storage: str, study_name: str) -> None:
    stored = study.user_attrs.get(_IDENTITY_ATTR)
    if stored is None:
        study.set_user_attr(_IDENTITY_ATTR, identity)
        return
    different = {k: (stored.get(k), v) for k, v in identity.items() if stored.get(k) != v}
    if different:
        summary = "; ".join(f"{k}: stored {old!r}, now {new!r}" for k, (old, new) in different.items())
        raise UserInputError(f"study {study_name!r} in {storage} tunes another problem ({summary}): "
                             f"choose another --output or --storage")


def _baseline(study: Any, runner: TrialRunner) -> Baseline:
    stored = study.user_attrs.get(_BASELINE_ATTR)
    if stored is not None:
        return Baseline(**stored)
    try:
        baseline = runner.baseline()
    except Exception as exc:  # e.g. B does not fit the main device: nothing to compare trials with
        raise UserInputError(f"measuring the SGD and SAM baseline failed: {describe_error(exc)}") from exc
    study.set_user_attr(_BASELINE_ATTR, asdict(baseline))
    return baseline


def _measure(runner: TrialRunner, config: TrialConfig) -> Measurement:
    measurement = runner.run(config)
    _check_measurement(measurement)
    return measurement


def _confirm(runner: TrialRunner, finals: list[Finalist], rounds: int,
             on_confirmation: Callable[[Finalist, int], None] | None) -> list[ConfirmationRun]:
    """``rounds`` rounds, each measuring every finalist once in turn (A, B, C, A, B, C, ...).

    A finalist whose window fails is dropped from the later rounds and keeps its error; the
    others go on (a dead worker must not cost the whole tuning).
    """
    windows: list[list[Measurement]] = [[] for _ in finals]
    errors: dict[int, str] = {}
    for round_number in range(1, rounds + 1):
        for index, finalist in enumerate(finals):
            if index in errors:
                continue
            if on_confirmation is not None:
                on_confirmation(finalist, round_number)
            try:
                windows[index].append(_measure(runner, finalist.outcome.config))
            except Exception as exc:
                errors[index] = describe_error(exc)
    return [ConfirmationRun(f, tuple(windows[i]), errors.get(i)) for i, f in enumerate(finals)]


def run_study(space: SearchSpace, runner: TrialRunner, *, margin: float, n_trials: int,
              timeout_s: float | None = None, storage: str | None = None, study_name: str = STUDY_NAME,
              seed: int | None = 0, planned: TrialConfig | None = None, identity: dict[str, Any] | None = None,
              on_trial: Callable[[Outcome], None] | None = None, sampler: Any = None,
              confirm_rounds: int = DEFAULT_CONFIRM_ROUNDS,
              on_confirmation: Callable[[Finalist, int], None] | None = None) -> StudyResult:
    """Run ``n_trials`` more trials (or until ``timeout_s``), judge every trial of the study and
    confirm the finalists in ``confirm_rounds`` rounds (0: the single windows decide).

    ``storage`` None keeps the study in memory (tests); ``identity`` guards a resumed study;
    ``sampler`` replaces the seeded TPE sampler (a brute-force one enumerates small spaces).
    """
    if not isinstance(confirm_rounds, int) or confirm_rounds < 0:
        raise UserInputError(f"Invalid confirmation rounds: {confirm_rounds!r} (expected an integer >= 0)")
    with _optuna_quiet() as optuna:
        study = optuna.create_study(storage=_storage(optuna, storage), study_name=study_name,
                                    directions=list(DIRECTIONS), sampler=sampler or _sampler(optuna, seed),
                                    load_if_exists=True)
        _check_identity(study, dict(identity or {}, margin=margin), storage or "memory", study_name)
        baseline = _baseline(study, runner)
        before = len(study.trials)
        if planned is not None:
            study.enqueue_trial(planned.params(), user_attrs={"from_cost_model": True}, skip_if_exists=True)
        native = _native_constraints(optuna)

        def objective(trial: Any) -> tuple[float, float]:
            try:
                config = space.suggest(trial)
                measurement = _measure(runner, config)
            except Exception as exc:
                trial.set_user_attr("error", describe_error(exc))
                raise  # study.optimize(catch=...) records the trial as FAIL
            excess = wait_excess_s(measurement, margin)
            trial.set_user_attr("measurement", asdict(measurement))
            trial.set_user_attr(CONSTRAINT, excess)
            if native:
                trial.set_constraint(CONSTRAINT, excess)
            return measurement.step_time_s, float(config.perturbation_batch_size)

        callbacks = [] if on_trial is None else [lambda _study, frozen: on_trial(outcome_of(frozen))]
        study.optimize(objective, n_trials=n_trials, timeout=timeout_s, catch=(Exception,), callbacks=callbacks)
        outcomes = [outcome_of(t) for t in study.get_trials(deepcopy=False)]
    planned_trial = next((o.number for o in outcomes if o.from_cost_model), None)
    front = pareto_front(outcomes, margin)
    choice = choose(outcomes, baseline.sgd_step_s, margin)
    finals = finalists(outcomes, front, choice, planned_trial, margin) if confirm_rounds else []
    confirmation = None
    if finals:
        runs = _confirm(runner, finals, confirm_rounds, on_confirmation)
        confirmation = rechoose(choice, runs, confirm_rounds, baseline.sgd_step_s, margin)
        choice = confirmation.choice
    return StudyResult(baseline, outcomes, front, choice, planned_trial, len(outcomes) - before,
                       storage or "memory", study_name, confirmation)
