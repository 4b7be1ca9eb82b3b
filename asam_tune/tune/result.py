"""What a study leaves behind: the tuned ``Plan`` and the ``Tuning`` record (no torch).

The tuned plan is the source plan with the chosen trial's perturbation device, threads, cores
and b_p, and predictions that are the trial's measurements (each field below says how; pooled
over its confirmation windows when it was a confirmed finalist); the other hidden
configurations on the Pareto front become its alternatives. The tuning record keeps every
trial, the confirmation, the baseline and the source plan's predictions beside them.
"""
from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timezone

from asam_tune import __version__
from asam_tune.costmodel.quality import measured_choice_update
from asam_tune.records.base import parse_record
from asam_tune.records.plan import Alternative, PerturbationDevice, Plan, Predictions
from asam_tune.records.profile import DeviceConfig
from asam_tune.records.tuning import ConfirmationLog, ConfirmationRound, MeasuredBaseline, TrialLog, Tuning
from asam_tune.tune.confirm import Confirmation, ConfirmationRun
from asam_tune.tune.selection import Measurement, Outcome, is_hidden, is_within_margin
from asam_tune.tune.space import SearchSpace, TrialConfig
from asam_tune.tune.study import Baseline, StudyResult

ALTERNATIVES = 5


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _transfer(plan: Plan, device: str) -> tuple[float, str]:
    """The plan's transfer to ``device`` (it depends on the device pair only), else assumed 0."""
    for perturbation, predictions in [(plan.perturbation, plan.predictions)] + [
            (a.perturbation, a.predictions) for a in plan.alternatives]:
        if perturbation.device == device and predictions.transfer != "not_applicable":
            return predictions.transfer_time_s, predictions.transfer
    return 0.0, "assumed"


def measured_predictions(plan: Plan, config: TrialConfig, m: Measurement, baseline: Baseline) -> Predictions:
    """Predictions filled with what the trial measured.

    main_time_s: the step without the wait; contention_slowdown: that over SGD's measured
    step; perturbation_time_s: the worker's time per job; transfers: the source plan's for the
    same device; uncertainties: the step's interquartile range (the worker's is not measured).
    """
    main_time = max(m.step_time_s - m.wait_s, 1e-9)
    worker_time = m.worker_time_s if m.worker_time_s > 0 else plan.predictions.perturbation_time_s
    transfer_s, transfer_source = _transfer(plan, config.worker_device)
    sgd, sam = baseline.sgd_step_s, baseline.sam_step_s
    hidden_fraction = (sam - m.step_time_s) / (sam - sgd) if sam > sgd else 0.0
    return Predictions(
        sgd_step_s=sgd, sam_step_s=sam, asam_step_s=m.step_time_s, main_time_s=main_time,
        perturbation_time_s=worker_time, transfer_time_s=transfer_s, hidden_fraction=hidden_fraction,
        speedup_over_sam=sam / m.step_time_s, contention_slowdown=main_time / sgd, contention="measured",
        transfer=transfer_source, main_time_uncertainty_s=m.step_time_iqr_s, perturbation_time_uncertainty_s=0.0)


def _main_key(plan: Plan, config: TrialConfig) -> str:
    return f"cpu/{config.main_threads}t" if config.main_threads is not None else plan.main_device


def _perturbation(config: TrialConfig, cores: tuple[int, ...] | None) -> PerturbationDevice:
    stream = config.perturbation.endswith("+stream")
    key = DeviceConfig(device=config.worker_device, threads=config.worker_threads, secondary_stream=stream).key
    return PerturbationDevice(device=config.worker_device, threads=config.worker_threads,
                              cores=cores if config.worker_threads is not None else None,
                              secondary_stream=stream, key=key)


def tuned_plan(plan: Plan, space: SearchSpace, result: StudyResult, *, margin: float,
               usable_core_ids: tuple[int, ...] | None, nearest_cores: tuple[int, ...] = (),
               created_at: str | None = None) -> Plan | None:
    """The plan with the chosen trial's configuration; None when no trial hid the perturbation.

    ``usable_core_ids``: this machine's, to pin the worker where the trial ran (None: unpinned).
    """
    chosen = result.choice.outcome
    if chosen is None:
        return None
    config, m, baseline = chosen.config, chosen.measurement, result.baseline
    cores = None
    if usable_core_ids is not None and config.worker_threads is not None:
        _, cores = space.placement(config, tuple(usable_core_ids), plan.reserved_cores, nearest_cores)
    predictions = measured_predictions(plan, config, m, baseline)
    alternatives = tuple(
        Alternative(main_device=_main_key(plan, o.config), perturbation=_perturbation(o.config, None),
                    perturbation_batch_size=o.config.perturbation_batch_size, mode="staleness1", staleness=1,
                    feasible=True, predictions=measured_predictions(plan, o.config, o.measurement, baseline))
        for o in _alternatives(result, chosen.number))
    perturbation = _perturbation(config, cores)
    margin_text = "within" if result.choice.within_margin else "not within"
    verdict = (f"tuned by measurement: asynchronous SAM with the ascent on {perturbation.key} "
               f"(b_p={config.perturbation_batch_size} of {plan.batch_size}) measured {_ms(m.step_time_s)} per step "
               f"against SGD's {_ms(baseline.sgd_step_s)} ({m.step_time_s / baseline.sgd_step_s:.2f}x, {margin_text} "
               f"the {margin:.0%} margin) and SAM's {_ms(baseline.sam_step_s)}; the main device waited "
               f"{_ms(m.wait_s)} per step")
    notes = (
        f"tuned from plan {plan.content_hash()[:12]} by asam-tune tune: trial {chosen.number} of study "
        f"{result.study_name!r} ({result.storage}), {result.choice.reason}",
        f"predictions are measurements of {_windows_text(result, chosen.number, m)} on this machine: main_time_s "
        f"is the step without waiting, contention_slowdown is that over SGD's measured step, transfers are the "
        f"source plan's",
        f"SGD and SAM were measured on {baseline.placement}",
    )
    tuned = plan.model_copy(update=dict(
        created_at=created_at or _now(), asam_tune_version=__version__, main_device=_main_key(plan, config),
        main_cores=config.main_threads if config.main_threads is not None else plan.main_cores, margin=margin,
        perturbation=perturbation, perturbation_batch_size=config.perturbation_batch_size, mode="staleness1",
        staleness=1, feasible=True, verdict=verdict, predictions=predictions, alternatives=alternatives,
        # A version-2 plan's hiding, expected gain and trade follow the measured b_p.
        **measured_choice_update(plan, config.perturbation_batch_size, notes)))
    # model_copy does not validate: go through the same path as a plan read from disk.
    return parse_record(Plan, json.loads(tuned.to_json()), "the tuned plan")


def _alternatives(result: StudyResult, chosen: int) -> list[Outcome]:
    """The rest of the front, with pooled numbers where confirmed; a finalist whose confirmation
    failed is no alternative."""
    confirmation = result.confirmation
    pooled = confirmation.pooled() if confirmation is not None else {}
    failed = {r.number for r in confirmation.runs if r.error is not None} if confirmation is not None else set()
    others = [o for o in result.front if o.number != chosen and o.number not in failed]
    return [replace(o, measurement=pooled.get(o.number, o.measurement)) for o in others][:ALTERNATIVES]


def _windows_text(result: StudyResult, chosen: int, m: Measurement) -> str:
    confirmation = result.confirmation
    run = next((r for r in confirmation.runs if r.number == chosen), None) if confirmation is not None else None
    if run is None or run.error is not None:
        return f"{m.steps} steps"
    return f"{m.steps} steps (medians over the trial's window and {len(run.rounds)} confirmation window(s))"


def trial_log(o: Outcome, baseline: Baseline, margin: float, front_numbers: set[int]) -> TrialLog:
    c, m = o.config, o.measurement
    fields: dict = {"number": o.number, "state": o.state, "from_cost_model": o.from_cost_model}
    if c is not None:
        fields.update(perturbation=c.perturbation, main_threads=c.main_threads, worker_threads=c.worker_threads,
                      perturbation_batch_size=c.perturbation_batch_size)
    if m is not None and o.state == "complete":
        fields.update(step_time_s=m.step_time_s, step_time_iqr_s=m.step_time_iqr_s, wait_s=m.wait_s,
                      worker_time_s=m.worker_time_s, hidden=is_hidden(m, margin),
                      within_margin=is_within_margin(m, baseline.sgd_step_s, margin),
                      pareto=o.number in front_numbers, steps=m.steps)
    if o.state == "fail":
        fields["error"] = o.error or "failed without an error message (interrupted?)"
    elif o.error:
        fields["error"] = o.error
    return TrialLog(**fields)


def confirmation_log(run: ConfirmationRun, baseline: Baseline, margin: float) -> ConfirmationLog:
    c, pooled = run.finalist.outcome.config, run.pooled
    fields: dict = {"trial": run.number, "roles": run.finalist.roles, "perturbation": c.perturbation,
                    "main_threads": c.main_threads, "worker_threads": c.worker_threads,
                    "perturbation_batch_size": c.perturbation_batch_size, "error": run.error,
                    "rounds": tuple(ConfirmationRound(step_time_s=m.step_time_s, step_time_iqr_s=m.step_time_iqr_s,
                                                      wait_s=m.wait_s, worker_time_s=m.worker_time_s, steps=m.steps)
                                    for m in run.rounds)}
    if pooled is not None:
        fields.update(step_time_s=pooled.step_time_s, step_time_iqr_s=pooled.step_time_iqr_s, wait_s=pooled.wait_s,
                      worker_time_s=pooled.worker_time_s, steps=pooled.steps, hidden=is_hidden(pooled, margin),
                      within_margin=is_within_margin(pooled, baseline.sgd_step_s, margin))
    return ConfirmationLog(**fields)


def _confirmation_verdict(confirmation: Confirmation | None) -> str:
    if confirmation is None or not confirmation.confirmed:
        return ""  # the choice's reason already says it was not confirmed
    if not confirmation.changed:
        return "; confirmation kept the study's choice"
    before = confirmation.study_choice.outcome
    return f"; confirmation changed the choice from trial {before.number} ({before.config.label()})"


def _verdict(result: StudyResult) -> str:
    chosen = result.choice.outcome
    if chosen is None:
        return f"no tuned plan: {result.choice.reason}"
    verdict = f"trial {chosen.number} ({chosen.config.label()}): {result.choice.reason}"
    if result.planned_trial is not None and result.planned_trial == chosen.number:
        verdict += "; the cost model's choice stands"
    return verdict + _confirmation_verdict(result.confirmation)


def tuning_record(plan: Plan, tuned: Plan | None, result: StudyResult, *, margin: float, steps: int, warmup: int,
                  min_trial_seconds: float | None = None, confirm_rounds: int | None = None,
                  created_at: str | None = None) -> Tuning:
    """``min_trial_seconds`` and ``confirm_rounds``: the flags, recorded when given."""
    front = {o.number for o in result.front}
    trials = tuple(trial_log(o, result.baseline, margin, front) for o in result.outcomes)
    chosen = result.choice.outcome
    confirmation = None
    if result.confirmation is not None:
        confirmation = tuple(confirmation_log(r, result.baseline, margin) for r in result.confirmation.runs)
    b = result.baseline
    return Tuning(created_at=created_at or _now(), asam_tune_version=__version__, workload=plan.workload,
                  batch_size=plan.batch_size, main_device=plan.main_device, margin=margin,
                  source_plan_hash=plan.content_hash(), tuned_plan_hash=None if tuned is None else tuned.content_hash(),
                  study_name=result.study_name, storage=result.storage, steps_per_trial=steps, warmup_steps=warmup,
                  baseline=MeasuredBaseline(sgd_step_s=b.sgd_step_s, sam_step_s=b.sam_step_s, placement=b.placement),
                  predicted=plan.predictions, planned_trial=result.planned_trial,
                  chosen_trial=None if chosen is None else chosen.number, verdict=_verdict(result), trials=trials,
                  min_trial_seconds=min_trial_seconds, confirm_rounds=confirm_rounds, confirmation=confirmation)
