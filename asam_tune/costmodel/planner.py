"""Choose the perturbation device and b_p, and write the decision as a ``Plan`` (no torch).

Ranking (best first), repeated on what is left to order the alternatives (``trade.rank``):
1. the smallest staleness (1 = fully or partially hidden, before any non-blocking choice);
2. among those, the candidates whose predicted step is within ``EQUIVALENT_STEP_TIME`` of
   the fastest (closer than profiles measure reliably);
3. among those, the largest b_p (a better ascent estimate), then the fewest CPU cores, then
   the faster step.
With a quality floor (the default) only options with ``b_p >= ceil(floor x B)`` are ranked:
each candidate's fully hidden b_p when it reaches the floor, else the floor, partially hidden
(``trade.floor_options``). A choice that is not faster than synchronous SAM on the baseline
gives a "synchronous" plan. Predictions that cannot be true are refused or warned about
(``plausibility``).
"""
from __future__ import annotations

import warnings
from datetime import datetime, timezone

from asam_tune import __version__
from asam_tune.costmodel.analysis import Analysis, analyse
from asam_tune.costmodel.candidates import Candidate, CoreBudget, main_cores_of
from asam_tune.costmodel.evaluate import Evaluation, perturbation_model
from asam_tune.costmodel.memory import parameter_bytes
from asam_tune.costmodel.plausibility import ImplausiblePlanError, findings, profile_load
from asam_tune.costmodel.quality import GAIN_TABLES, Floor, gain_text, resolve_floor, rho_rule_named
from asam_tune.costmodel.trade import (
    EQUIVALENT_STEP_TIME, expected_gain_of, floor_notes, floor_options, hiding_text, rank, trade,
)
from asam_tune.records.plan import Alternative, PerturbationDevice, Plan, Predictions, Quality
from asam_tune.records.profile import DeviceConfig, Profile
from asam_tune.records.rho_rule import RhoRule

__all__ = ["EQUIVALENT_STEP_TIME", "make_plan", "plan_from_analysis", "rank"]

ALTERNATIVES = 5
# Below this share of B, say that the ascent direction comes from few samples.
SMALL_PERTURBATION_SHARE = 0.25


def worker_core_ids(profile: Profile, candidate: Candidate, budget: CoreBudget,
                    nproc_per_node: int) -> tuple[int, ...] | None:
    """Cores to pin a CPU worker to: after the main process's and data loading's, nearest the GPU first."""
    affinity = profile.fingerprint.cpu.affinity
    if not candidate.perturbation.is_cpu or nproc_per_node != 1 or not affinity:
        return None
    pool = sorted(affinity)
    main = candidate.main
    if main.device.startswith("cuda:"):
        index = int(main.device.split(":")[1])
        nearest = next((g.nearest_cores for g in profile.fingerprint.gpus if g.index == index), None) or ()
        near = [c for c in sorted(nearest) if c in affinity]
        pool = near + [c for c in pool if c not in near]
    skip = candidate.main_cores + budget.reserved
    chosen = pool[skip:skip + candidate.worker_cores]
    return tuple(chosen) if len(chosen) == candidate.worker_cores else None


def _device(config: DeviceConfig, cores: tuple[int, ...] | None = None) -> PerturbationDevice:
    return PerturbationDevice(device=config.device, threads=config.threads, cores=cores,
                              secondary_stream=config.secondary_stream, key=config.key)


def _predictions(e: Evaluation) -> Predictions:
    c = e.candidate
    # Partially hidden, the worker's cycle may be the longer one: its spread is the step's.
    main_uncertainty = e.asam_uncertainty_s if e.partial else e.main_uncertainty_s
    return Predictions(
        sgd_step_s=e.baseline.sgd_step_s, sam_step_s=e.baseline.sam_step_s, asam_step_s=e.asam_step_s,
        main_time_s=e.main_time_s, perturbation_time_s=e.perturbation_time_s,
        transfer_time_s=c.transfer.total_s, hidden_fraction=e.hidden_fraction,
        speedup_over_sam=e.speedup_over_sam, contention_slowdown=c.slowdown, contention=c.contention,
        transfer=c.transfer.source, main_time_uncertainty_s=main_uncertainty,
        perturbation_time_uncertainty_s=e.perturbation_uncertainty_s)


def _mode(e: Evaluation) -> str:
    return "staleness1" if e.staleness == 1 else "non_blocking"


def _alternative(e: Evaluation) -> Alternative:
    return Alternative(main_device=e.candidate.main.key, perturbation=_device(e.candidate.perturbation),
                       perturbation_batch_size=e.perturbation_batch_size, mode=_mode(e), staleness=e.staleness,
                       feasible=e.hidden, predictions=_predictions(e), hiding=e.hiding)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _notes_for(a: Analysis, e: Evaluation) -> list[str]:
    """Every assumption behind the chosen evaluation's numbers."""
    c, notes = e.candidate, []
    main_model, pert_model = a.models[c.main.key], perturbation_model(a.models, c.perturbation.key)
    if c.contention == "assumed":
        notes.append(f"the slowdown of {c.main.key} while {c.perturbation.key} computes was not measured: "
                     f"assumed none (1.0)")
    if c.transfer.source == "assumed":
        notes.append(f"the transfer {c.main.key} -> {c.perturbation.key} was not measured: assumed 0 s")
    elif c.transfer.source == "measured" and c.main.is_cpu != c.perturbation.is_cpu:
        # Pinned or pageable means something only for a copy between host and accelerator.
        pinned = "pinned" if c.transfer.pinned else "pageable"
        notes.append(f"transfer times are those measured with {pinned} host memory")
    elif c.transfer.source == "measured":
        notes.append(f"transfer times are those measured between {c.main.device} and {c.perturbation.device}")
    notes.extend(_handover_notes(c))
    notes.extend(_ascent_dtype_notes(a.profile, c, a.models[c.perturbation.key].ascent_curve is not None))
    if main_model.curve.is_extrapolated(a.batch_size):
        notes.append(f"B={a.batch_size} is beyond the largest batch measured on {c.main.key} "
                     f"({main_model.curve.batch_sizes[-1]}): its time is extrapolated")
    if not main_model.curve.fits_in_memory(a.batch_size):
        notes.append(f"the profile saw {c.main.key} run out of memory above batch "
                     f"{main_model.curve.largest_fitting_batch}: B={a.batch_size} may not fit")
    if pert_model.curve.is_extrapolated(e.perturbation_batch_size):
        notes.append(f"b_p={e.perturbation_batch_size} is beyond the largest batch measured on "
                     f"{c.perturbation.key} ({pert_model.curve.batch_sizes[-1]}): its time is extrapolated")
    if e.hidden and e.perturbation_time_s + e.perturbation_uncertainty_s > e.budget_s:
        notes.append(f"the perturbation's measured spread (+{_ms(e.perturbation_uncertainty_s)}) reaches past "
                     f"the margin: it may sometimes be late; a larger margin or `asam-tune tune` settles it")
    if e.perturbation_batch_size < SMALL_PERTURBATION_SHARE * a.batch_size and not e.partial:
        notes.append(f"b_p is {e.perturbation_batch_size / a.batch_size:.0%} of B: the ascent direction comes "
                     f"from few samples")
    return notes


def _ascent_dtype_notes(profile: Profile, c: Candidate, measured: bool) -> list[str]:
    dtype = profile.ascent_dtype
    if dtype is None:
        return []
    if measured:
        return [f"the ascent's times on {c.perturbation.key} were measured with its forward under autocast to "
                f"{dtype}, as AsyncSAM runs it from this plan"]
    return [f"the ascent on {c.perturbation.key} was not measured in {dtype}: its times are those of the "
            f"parameters' dtype"]


def _handover_notes(c: Candidate) -> list[str]:
    """What the main step carries for handing the ascent to a CPU worker process, and from where."""
    h = c.handover
    if h.source == "not_applicable":
        return []
    if h.source == "assumed":
        return [f"the handover {c.main.key} -> {c.perturbation.key} (submit, collect, perturb and restore) was not "
                f"measured (a version-1 profile?): assumed 0 s"]
    pair = f"{c.main.key} -> {c.perturbation.key}"
    measured_pair = " -> ".join(h.measured_for) if h.measured_for else pair
    if measured_pair != pair:
        return [f"the handover {pair} was not measured: the main step carries the {_ms(h.seconds)} measured for "
                f"{measured_pair}"]
    where = ""
    if not c.main.is_cpu:
        where = (f", timed from the weights on {c.main.device} (the gather and the result's copy up included)"
                 if h.on_accelerator else
                 ", timed from weights in host memory: the main stream's waits for the gather and the result's "
                 "copy up are not in it (profile again to time them)")
    return [f"the main step carries the measured handover {pair} (submit, collect, perturb and restore): "
            f"{_ms(h.seconds)}{where}"]


def _verdict(a: Analysis, e: Evaluation, rule: RhoRule) -> str:
    c = e.candidate
    gain = (f"predicted {_ms(e.asam_step_s)} per step against SAM's {_ms(e.baseline.sam_step_s)} "
            f"({e.speedup_over_sam:.2f}x) and SGD's {_ms(e.baseline.sgd_step_s)}, {e.hidden_fraction:.0%} of SAM's "
            f"extra cost hidden; expected to keep {gain_text(expected_gain_of(e, a.batch_size, rule))} of SAM's "
            f"accuracy gain")
    if e.partial:
        return (f"asynchronous SAM with the ascent on {c.perturbation.key} at the quality floor (b_p="
                f"{e.perturbation_batch_size} of {a.batch_size}) hides the perturbation only partially (the main "
                f"step waits for it): {gain}")
    if e.hidden:
        return (f"asynchronous SAM with the ascent on {c.perturbation.key} (b_p={e.perturbation_batch_size} of "
                f"{a.batch_size}) hides the perturbation: {gain}")
    return (f"no device hides even b_p=1 within one main step ({_ms(e.budget_s)} with the margin); non-blocking "
            f"mode on {c.perturbation.key} runs at staleness {e.staleness} with "
            f"b_p={e.perturbation_batch_size}: {gain}")


def _synchronous_verdict(a: Analysis, ordered: list[Evaluation], floor: Floor,
                         hides_fully: Evaluation | None) -> str:
    base = a.base
    if not ordered and hides_fully is not None:
        return (f"no perturbation device can hold b_p >= {floor.batch} (the quality floor) in memory; use "
                f"synchronous SAM on {base.config.key} ({_ms(base.sam_step_s)} per step)")
    if not ordered:
        return (f"no device can compute the perturbation beside the main step on this machine; use "
                f"synchronous SAM on {base.config.key} ({_ms(base.sam_step_s)} per step)")
    best = ordered[0]
    split = (f"{best.candidate.main.key} + {best.candidate.perturbation.key}, b_p={best.perturbation_batch_size}"
             f"{', partially hidden' if best.partial else ''}")
    if floor.fraction is not None and best.partial:
        cheaper = ""
        if hides_fully is not None and hides_fully.asam_step_s < base.sam_step_s:
            cheaper = (f"; {hiding_text(hides_fully)} (b_p={hides_fully.perturbation_batch_size}, "
                       f"{_ms(hides_fully.asam_step_s)}) would give up the gain the floor keeps")
        return (f"even at the quality floor asynchronous SAM is slower than SAM: the best split ({split}) predicts "
                f"{_ms(best.asam_step_s)} per step, synchronous SAM on {base.config.key} {_ms(base.sam_step_s)}"
                f"{cheaper}; synchronous SAM is the honest choice")
    return (f"asynchronous SAM is not worth it here: the best split ({split}) predicts {_ms(best.asam_step_s)} per "
            f"step, synchronous SAM on {base.config.key} {_ms(base.sam_step_s)}; use synchronous SAM")


def _synchronous_plan_fields(a: Analysis, ordered: list[Evaluation], floor: Floor,
                             hides_fully: Evaluation | None) -> dict:
    base, model = a.base, a.base_model
    forward_backward_uncertainty = model.curve.uncertainty_s(a.batch_size)
    predictions = Predictions(
        sgd_step_s=base.sgd_step_s, sam_step_s=base.sam_step_s, asam_step_s=base.sam_step_s,
        main_time_s=base.sgd_step_s, perturbation_time_s=base.sam_step_s - base.sgd_step_s, transfer_time_s=0.0,
        hidden_fraction=0.0, speedup_over_sam=1.0, contention_slowdown=1.0, contention="not_applicable",
        transfer="not_applicable", main_time_uncertainty_s=forward_backward_uncertainty + model.optimizer_spread_s,
        perturbation_time_uncertainty_s=forward_backward_uncertainty)
    return dict(main_device=base.config.key, main_cores=main_cores_of(base.config), perturbation=_device(base.config),
                perturbation_batch_size=a.batch_size, mode="synchronous", staleness=0,
                feasible=bool(ordered) and ordered[0].hidden,
                verdict=_synchronous_verdict(a, ordered, floor, hides_fully), predictions=predictions,
                alternatives=tuple(_alternative(e) for e in ordered[:ALTERNATIVES]), hiding="none")


def _check_plausible(a: Analysis, chosen: Evaluation | None, busy: bool | None) -> list[str]:
    """Refuse a plan whose predictions cannot be true on a busy profile; warn otherwise, and
    return the impossible ones for the plan's notes (a slower-than-SAM plan has its own note)."""
    if chosen is None:
        return []
    sgd_spread = a.base_model.curve.uncertainty_s(a.batch_size) + a.base_model.optimizer_spread_s
    found = findings(sgd_step_s=a.base.sgd_step_s, sam_step_s=a.base.sam_step_s,
                     asam_step_s=chosen.asam_step_s, asam_uncertainty_s=chosen.asam_uncertainty_s,
                     sgd_uncertainty_s=sgd_spread, busy=busy)
    for finding in found:
        if finding.refuse:
            raise ImplausiblePlanError(finding.message)
    for finding in found:
        warnings.warn(finding.message, stacklevel=4)
    return [finding.message for finding in found if finding.impossible]


def plan_from_analysis(a: Analysis, *, asynchronous: bool = False, min_perturbation_fraction: float | None | str = "default",
                       rho_rule: str | RhoRule = "default") -> Plan:
    """``asynchronous``: take the best split even where synchronous SAM on all cores is faster
    (the user wants the split, e.g. to keep cores free); the plan notes what it costs.
    ``min_perturbation_fraction``: the quality floor on b_p / B ("default": the rule's measured
    floor, None: none, hide fully whatever b_p); ``rho_rule``: "default", "none" or a RhoRule."""
    rule = rho_rule_named(rho_rule)
    floor = resolve_floor(min_perturbation_fraction, rule, a.batch_size)
    hiding_order = rank(a.evaluations)
    hides_fully = hiding_order[0] if hiding_order else None
    ordered = hiding_order if floor.fraction is None else floor_options(a, floor)
    notes = list(a.notes)
    load = profile_load(a.profile)
    if load.busy:
        notes.append(f"the profile was measured on a busy machine ({load.summary}): its timings, and this plan's "
                     f"predictions, may be inflated")
        warnings.warn(f"the profile was measured on a busy machine: {load.summary}", stacklevel=3)
    slower_than_sam = bool(ordered) and ordered[0].asam_step_s >= a.base.sam_step_s
    chosen = None
    if not ordered or (slower_than_sam and not asynchronous):
        fields = _synchronous_plan_fields(a, ordered, floor, hides_fully)
    else:
        best = chosen = ordered[0]
        cores = worker_core_ids(a.profile, best.candidate, a.budget, a.nproc_per_node)
        if best.candidate.perturbation.is_cpu and cores is None:
            notes.append("worker cores are not pinned by the plan (several ranks or unknown affinity): the runtime "
                         "picks them")
        notes.extend(_notes_for(a, best))
        if slower_than_sam:
            notes.append(f"asynchronous SAM was asked for, but synchronous SAM on {a.base.config.key} is predicted "
                         f"faster ({_ms(a.base.sam_step_s)} against {_ms(best.asam_step_s)} per step)")
        fields = dict(main_device=best.candidate.main.key, main_cores=best.candidate.main_cores,
                      perturbation=_device(best.candidate.perturbation, cores),
                      perturbation_batch_size=best.perturbation_batch_size, mode=_mode(best),
                      staleness=best.staleness, feasible=best.hidden, verdict=_verdict(a, best, rule),
                      predictions=_predictions(best), hiding=best.hiding,
                      alternatives=tuple(_alternative(e) for e in ordered[1:1 + ALTERNATIVES]))
    notes.extend(floor_notes(a, floor, rule, hides_fully, chosen))
    notes.extend(_check_plausible(a, chosen, load.busy))
    size, size_note = parameter_bytes(a.profile)
    if size_note:
        notes.append(size_note)
    quality = Quality(min_perturbation_fraction=floor.fraction, min_perturbation_batch_size=floor.batch,
                      floor_source=floor.source, expected_gain=expected_gain_of(chosen, a.batch_size, rule),
                      gain_source=GAIN_TABLES[rule.kind].source)
    keeps_gain = ordered[0] if ordered and floor.fraction is not None else None
    return Plan(created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                asam_tune_version=__version__, profile_fingerprint=a.profile.fingerprint,
                profile_hash=a.profile.content_hash(), workload=a.profile.workload, parameter_bytes=size,
                batch_size=a.batch_size, reserved_cores=a.budget.reserved, nproc_per_node=a.nproc_per_node,
                margin=a.margin, notes=tuple(notes), rho_rule=rule, quality=quality,
                trade=trade(a, floor, rule, hides_fully, keeps_gain, chosen, asynchronous), profile_load=load,
                ascent_dtype=a.profile.ascent_dtype, **fields)


def make_plan(profile: Profile, batch_size: int, *, main_device: str | None = None, margin: float = 0.05,
              reserved_cores: int = 0, nproc_per_node: int = 1, asynchronous: bool = False,
              min_perturbation_fraction: float | None | str = "default", rho_rule: str | RhoRule = "default") -> Plan:
    """The plan for training with batch size ``batch_size`` on the profiled machine.

    ``min_perturbation_fraction``: the quality floor on b_p / B ("default": the measured floor
    for the rule; None: no floor, the version-1 behaviour); ``rho_rule``: "default" (the
    measured rule, ``quality.DEFAULT_RHO_RULE``), "none" (rho fixed) or a ``RhoRule``.
    """
    analysis = analyse(profile, batch_size, main_device=main_device, margin=margin,
                       reserved_cores=reserved_cores, nproc_per_node=nproc_per_node)
    return plan_from_analysis(analysis, asynchronous=asynchronous, min_perturbation_fraction=min_perturbation_fraction,
                              rho_rule=rho_rule)
