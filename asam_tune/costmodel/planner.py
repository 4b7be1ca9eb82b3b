"""Choose the perturbation device and b_p, and write the decision as a ``Plan`` (no torch).

Ranking (best first), repeated on what is left to order the alternatives:
1. the smallest staleness (1 = fully hidden, before any non-blocking choice);
2. among those, the candidates whose predicted step is within ``EQUIVALENT_STEP_TIME`` of
   the fastest (closer than profiles measure reliably);
3. among those, the largest b_p (a better ascent estimate), then the fewest CPU cores, then
   the faster step.
A choice that is not faster than synchronous SAM on the baseline gives a "synchronous" plan.
"""
from __future__ import annotations

from datetime import datetime, timezone

from asam_tune import __version__
from asam_tune.costmodel.analysis import Analysis, analyse
from asam_tune.costmodel.candidates import Candidate, CoreBudget, main_cores_of
from asam_tune.costmodel.evaluate import Evaluation
from asam_tune.costmodel.memory import parameter_bytes
from asam_tune.records.plan import Alternative, PerturbationDevice, Plan, Predictions
from asam_tune.records.profile import DeviceConfig, Profile

# Predicted steps closer than this (relative) count as equally fast.
EQUIVALENT_STEP_TIME = 0.03
ALTERNATIVES = 5
# Below this share of B, say that the ascent direction comes from few samples.
SMALL_PERTURBATION_SHARE = 0.25


def rank(evaluations: list[Evaluation]) -> list[Evaluation]:
    """The evaluations, best first (see the module docstring)."""
    remaining = list(evaluations)
    ordered: list[Evaluation] = []
    while remaining:
        staleness = min(e.staleness for e in remaining)
        pool = [e for e in remaining if e.staleness == staleness]
        fastest = min(e.asam_step_s for e in pool)
        band = [e for e in pool if e.asam_step_s <= fastest * (1 + EQUIVALENT_STEP_TIME)]
        best = max(band, key=lambda e: (e.perturbation_batch_size, -e.candidate.total_cores,
                                        -e.asam_step_s, -e.perturbation_time_s))
        ordered.append(best)
        remaining.remove(best)
    return ordered


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
    return Predictions(
        sgd_step_s=e.baseline.sgd_step_s, sam_step_s=e.baseline.sam_step_s, asam_step_s=e.asam_step_s,
        main_time_s=e.main_time_s, perturbation_time_s=e.perturbation_time_s,
        transfer_time_s=c.transfer.total_s, hidden_fraction=e.hidden_fraction,
        speedup_over_sam=e.speedup_over_sam, contention_slowdown=c.slowdown, contention=c.contention,
        transfer=c.transfer.source, main_time_uncertainty_s=e.main_uncertainty_s,
        perturbation_time_uncertainty_s=e.perturbation_uncertainty_s)


def _mode(e: Evaluation) -> str:
    return "staleness1" if e.hidden else "non_blocking"


def _alternative(e: Evaluation) -> Alternative:
    return Alternative(main_device=e.candidate.main.key, perturbation=_device(e.candidate.perturbation),
                       perturbation_batch_size=e.perturbation_batch_size, mode=_mode(e), staleness=e.staleness,
                       feasible=e.hidden, predictions=_predictions(e))


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _notes_for(a: Analysis, e: Evaluation) -> list[str]:
    """Every assumption behind the chosen evaluation's numbers."""
    c, notes = e.candidate, []
    main_model, pert_model = a.models[c.main.key], a.models[c.perturbation.key]
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
    if e.perturbation_batch_size < SMALL_PERTURBATION_SHARE * a.batch_size:
        notes.append(f"b_p is {e.perturbation_batch_size / a.batch_size:.0%} of B: the ascent direction comes "
                     f"from few samples")
    return notes


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
    return [f"the main step carries the measured handover {pair} (submit, collect, perturb and restore): "
            f"{_ms(h.seconds)}"]


def _verdict(a: Analysis, e: Evaluation) -> str:
    c = e.candidate
    gain = (f"predicted {_ms(e.asam_step_s)} per step against SAM's {_ms(e.baseline.sam_step_s)} "
            f"({e.speedup_over_sam:.2f}x), {e.hidden_fraction:.0%} of SAM's extra cost hidden")
    if e.hidden:
        return (f"asynchronous SAM with the ascent on {c.perturbation.key} (b_p={e.perturbation_batch_size} of "
                f"{a.batch_size}) hides the perturbation: {gain}")
    return (f"no device hides even b_p=1 within one main step ({_ms(e.budget_s)} with the margin); non-blocking "
            f"mode on {c.perturbation.key} runs at staleness {e.staleness} with "
            f"b_p={e.perturbation_batch_size}: {gain}")


def _synchronous_plan_fields(a: Analysis, ordered: list[Evaluation]) -> dict:
    base, model = a.base, a.base_model
    forward_backward_uncertainty = model.curve.uncertainty_s(a.batch_size)
    predictions = Predictions(
        sgd_step_s=base.sgd_step_s, sam_step_s=base.sam_step_s, asam_step_s=base.sam_step_s,
        main_time_s=base.sgd_step_s, perturbation_time_s=base.forward_backward_s, transfer_time_s=0.0,
        hidden_fraction=0.0, speedup_over_sam=1.0, contention_slowdown=1.0, contention="not_applicable",
        transfer="not_applicable", main_time_uncertainty_s=forward_backward_uncertainty + model.optimizer_spread_s,
        perturbation_time_uncertainty_s=forward_backward_uncertainty)
    if ordered:
        best = ordered[0]
        verdict = (f"asynchronous SAM is not worth it here: the best split ({best.candidate.main.key} + "
                   f"{best.candidate.perturbation.key}, b_p={best.perturbation_batch_size}) predicts "
                   f"{_ms(best.asam_step_s)} per step, synchronous SAM on {base.config.key} {_ms(base.sam_step_s)}; "
                   f"use synchronous SAM")
    else:
        verdict = (f"no device can compute the perturbation beside the main step on this machine; use "
                   f"synchronous SAM on {base.config.key} ({_ms(base.sam_step_s)} per step)")
    return dict(main_device=base.config.key, main_cores=main_cores_of(base.config), perturbation=_device(base.config),
                perturbation_batch_size=a.batch_size, mode="synchronous", staleness=0,
                feasible=bool(ordered) and ordered[0].hidden, verdict=verdict, predictions=predictions,
                alternatives=tuple(_alternative(e) for e in ordered[:ALTERNATIVES]))


def plan_from_analysis(a: Analysis, *, asynchronous: bool = False) -> Plan:
    """``asynchronous``: take the best split even where synchronous SAM on all cores is faster
    (the user wants the split, e.g. to keep cores free); the plan notes what it costs."""
    ordered = rank(a.evaluations)
    notes = list(a.notes)
    slower_than_sam = bool(ordered) and ordered[0].asam_step_s >= a.base.sam_step_s
    if not ordered or (slower_than_sam and not asynchronous):
        fields = _synchronous_plan_fields(a, ordered)
    else:
        best = ordered[0]
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
                      staleness=best.staleness, feasible=best.hidden, verdict=_verdict(a, best),
                      predictions=_predictions(best),
                      alternatives=tuple(_alternative(e) for e in ordered[1:1 + ALTERNATIVES]))
    size, size_note = parameter_bytes(a.profile)
    if size_note:
        notes.append(size_note)
    return Plan(created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                asam_tune_version=__version__, profile_fingerprint=a.profile.fingerprint,
                profile_hash=a.profile.content_hash(), workload=a.profile.workload, parameter_bytes=size,
                batch_size=a.batch_size, reserved_cores=a.budget.reserved, nproc_per_node=a.nproc_per_node,
                margin=a.margin, notes=tuple(notes), **fields)


def make_plan(profile: Profile, batch_size: int, *, main_device: str | None = None, margin: float = 0.05,
              reserved_cores: int = 0, nproc_per_node: int = 1, asynchronous: bool = False) -> Plan:
    """The plan for training with batch size ``batch_size`` on the profiled machine."""
    analysis = analyse(profile, batch_size, main_device=main_device, margin=margin,
                       reserved_cores=reserved_cores, nproc_per_node=nproc_per_node)
    return plan_from_analysis(analysis, asynchronous=asynchronous)
