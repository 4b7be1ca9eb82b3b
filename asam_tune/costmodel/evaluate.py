"""The step-time formulas: SGD and SAM baselines, and one candidate's b_p and predictions (no torch).

    T_main(B)   = fwd_bwd_main(B) * slowdown + opt_main + transfers_main + handover
    T_pert(b)   = fwd_bwd_pert(b) * slowdown_pert + transfer_to + transfer_back (see below)
    budget      = (1 - margin) * T_main(B)
    b_p         = the largest b <= B (and below the device's OOM) with T_pert(b) <= budget
    T_SGD       = fwd_bwd_base(B) + opt_base;   T_SAM = fwd_bwd_base(B) + ascent_base(B) + opt_base
                  (ascent_base: the ascent curve in the profile's ascent_dtype, else fwd_bwd_base)
    T_ASAM      = T_main(B) when hidden (and in non-blocking mode, which never waits)

transfers_main = transfer_to + transfer_back when the main device is an accelerator, the
worker the CPU and the transfers were measured with pageable host memory: a pageable copy
blocks the host, so both copies lie on the main step's path (and on the worker's, which cannot
start before the first); 0 otherwise. With page-locked memory the runtime copies on a copy
stream of its own, ordered by events (perturbers/copy_stream.py): the main stream waits for a
device-to-device gather of the weights and, at collect, for the result's copy up; the weights'
copy to the host lies on the worker's path.

A handover timed from the GPU's weights (``weights_on``) holds what the main stream waits for
(the gather, the result's copy up) and, with pageable memory, the blocking copies: then
transfers_main is 0 and T_pert carries transfer_to only. A handover timed from host weights
(profiles before ``weights_on``) holds neither: T_pert carries both transfers.

handover is the main process's fixed cost per step of using a CPU worker process (submit,
collect, keep/perturb/restore; the profile's HandoverPoint, see candidates.find_handover); 0
for an accelerator's worker. Measured from a GPU's weights (``weights_on``), it holds what the
main stream waits for on the copy-stream path (the gather, the result's copy up), and the
pageable copies too when page-locking failed: those are then not added again. Being on the
main step's path it lengthens T_main, and with it the budget.

slowdown_pert is the measured slowdown too when main and perturbation both compute on the CPU
(they share its memory bandwidth and caches, so the busy worker slows as the main does), and
1 for an accelerator.

When even b = 1 does not fit, the staleness is s = ceil(T_pert(1) / budget) and b_p is the
largest b with T_pert(b) <= s * budget (non-blocking mode).

Partial hiding (``at_least``): a b_p above the one that hides, at staleness 1. The main step
then waits for the ascent, and a step takes whichever cycle is longer: the main step's, or the
worker's job plus the handover that starts and ends it on the main process::

    T_ASAM = max(T_main(B), T_pert(b_p) + handover)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from asam_tune.costmodel.candidates import Candidate
from asam_tune.costmodel.curves import TimeCurve, fit_time_curve, optimizer_step_spread_s, optimizer_step_time_s
from asam_tune.records.profile import DeviceConfig, DeviceProfile, Profile

# Relative slack when comparing times: exact hand-computed boundaries count as fitting.
_EPS = 1e-9


@dataclass(frozen=True)
class DeviceModel:
    config: DeviceConfig
    curve: TimeCurve
    optimizer_s: float
    optimizer_spread_s: float
    # Forward+backward under autocast to the profile's ascent_dtype (None: not measured).
    ascent_curve: TimeCurve | None = None

    def step_s(self, batch: int) -> float:
        """One SGD step on this configuration alone."""
        return self.curve.time_s(batch) + self.optimizer_s


def device_models(profile: Profile) -> dict[str, DeviceModel]:
    """A fitted model for every configuration with at least one successful timing."""
    return {d.config.key: DeviceModel(d.config, fit_time_curve(d), optimizer_step_time_s(d),
                                      optimizer_step_spread_s(d), _ascent_curve(d))
            for d in profile.devices if d.ok_points()}


def _ascent_curve(d: DeviceProfile) -> TimeCurve | None:
    return fit_time_curve(d.model_copy(update={"points": d.ascent_points})) if d.ascent_ok_points() else None


def perturbation_model(models: dict[str, DeviceModel], key: str) -> DeviceModel:
    """Configuration ``key`` as the perturbation device: its curve is the ascent's, measured in
    the ascent's dtype when the profile did, else its own (the parameters' dtype)."""
    model = models[key]
    return model if model.ascent_curve is None else replace(model, curve=model.ascent_curve)


@dataclass(frozen=True)
class Baseline:
    """SGD and synchronous SAM on ``config`` (the main GPU, or every free core of the CPU)."""

    config: DeviceConfig
    forward_backward_s: float
    sgd_step_s: float
    sam_step_s: float


def baseline(model: DeviceModel, batch_size: int) -> Baseline:
    """SAM's ascent in the dtype the plan runs it in: the ascent curve when the profile has one
    (AsyncSAM's synchronous path runs its ascent in that dtype too)."""
    forward_backward = model.curve.time_s(batch_size)
    ascent = forward_backward if model.ascent_curve is None else model.ascent_curve.time_s(batch_size)
    return Baseline(model.config, forward_backward, forward_backward + model.optimizer_s,
                    forward_backward + ascent + model.optimizer_s)


@dataclass(frozen=True)
class Evaluation:
    """One candidate at batch size B: its b_p, staleness and predicted times."""

    candidate: Candidate
    perturbation_batch_size: int
    staleness: int
    main_time_s: float
    main_uncertainty_s: float
    perturbation_time_s: float
    perturbation_uncertainty_s: float
    budget_s: float
    baseline: Baseline
    # True: b_p is larger than what hides within the budget, at staleness 1 (the main step waits).
    partial: bool = False

    @property
    def hidden(self) -> bool:
        return self.staleness == 1 and not self.partial

    @property
    def hiding(self) -> str:
        """'full', 'partial' or 'stale' (non-blocking): the plan's ``hiding``."""
        if self.partial:
            return "partial"
        return "full" if self.staleness == 1 else "stale"

    @property
    def asam_step_s(self) -> float:
        # Hidden: max(T_main, T_pert) = T_main. Non-blocking: the main step never waits.
        if self.partial:
            return max(self.main_time_s, self.perturbation_time_s + self.candidate.handover.seconds)
        return self.main_time_s

    @property
    def asam_uncertainty_s(self) -> float:
        """The spread of ``asam_step_s``: the main step's, or the worker's cycle's when it is longer."""
        if self.partial and self.perturbation_time_s + self.candidate.handover.seconds > self.main_time_s:
            return self.perturbation_uncertainty_s + self.candidate.handover.spread_s
        return self.main_uncertainty_s

    @property
    def hidden_fraction(self) -> float:
        b = self.baseline
        return (b.sam_step_s - self.asam_step_s) / (b.sam_step_s - b.sgd_step_s)

    @property
    def speedup_over_sam(self) -> float:
        return self.baseline.sam_step_s / self.asam_step_s


def largest_batch_within(time_of, limit_s: float, upper: int) -> int:
    """Largest b in [1, upper] with time_of(b) <= limit_s (time_of non-decreasing); 0 if none."""
    fits = lambda b: time_of(b) <= limit_s * (1 + _EPS)  # noqa: E731
    if upper < 1 or not fits(1):
        return 0
    low, high = 1, upper  # fits(low) holds
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def _perturbation_slowdown(candidate: Candidate) -> float:
    # Two CPU processes slow each other alike; a GPU main leaves the CPU worker's speed alone.
    return candidate.slowdown if candidate.main.is_cpu and candidate.perturbation.is_cpu else 1.0


def perturbation_time_s(candidate: Candidate, models: dict[str, DeviceModel], batch: int) -> float:
    """T_pert(b): the ascent's forward+backward on the perturbation device plus its transfers."""
    curve = perturbation_model(models, candidate.perturbation.key).curve
    return curve.time_s(batch) * _perturbation_slowdown(candidate) + worker_transfer_s(candidate)


def worker_transfer_s(candidate: Candidate) -> float:
    """The transfers on the worker's path: both; only the weights' when the handover was timed
    from the GPU's weights, which holds the result's copy up (the main stream waits for it)."""
    if candidate.handover.on_accelerator:
        return candidate.transfer.to_target_s
    return candidate.transfer.total_s


def largest_perturbation_batch(candidate: Candidate, models: dict[str, DeviceModel], batch_size: int) -> int:
    """The largest b_p the perturbation device may be given: B, or below its first OOM."""
    memory_limit = perturbation_model(models, candidate.perturbation.key).curve.largest_fitting_batch
    return batch_size if memory_limit is None else min(batch_size, memory_limit)


def at_least(e: Evaluation, models: dict[str, DeviceModel], batch_size: int, minimum: int) -> Evaluation | None:
    """``e`` when it hides ``b_p >= minimum`` fully; else the same candidate at ``b_p = minimum``
    and staleness 1, partially hidden; None when the device cannot hold ``minimum`` samples."""
    if e.hidden and e.perturbation_batch_size >= minimum:
        return e
    if minimum > largest_perturbation_batch(e.candidate, models, batch_size):
        return None
    pert = perturbation_model(models, e.candidate.perturbation.key)
    return replace(e, perturbation_batch_size=minimum, staleness=1, partial=True,
                   perturbation_time_s=perturbation_time_s(e.candidate, models, minimum),
                   perturbation_uncertainty_s=pert.curve.uncertainty_s(minimum) + e.candidate.transfer.spread_s)


def evaluate(candidate: Candidate, models: dict[str, DeviceModel], batch_size: int, margin: float,
             base: Baseline) -> Evaluation | None:
    """Predictions for one candidate; None when it cannot run a single sample (out of memory)."""
    main = models[candidate.main.key]
    pert = perturbation_model(models, candidate.perturbation.key)
    transfer = candidate.transfer.total_s
    # The runtime copies to and from a CPU worker's shared memory on a copy stream; only
    # pageable memory (page-locking failed) makes the host, and so the main step, wait for them,
    # unless the handover was measured from the GPU's weights: then those waits are in it.
    copies_on_main = (not candidate.main.is_cpu and candidate.perturbation.is_cpu
                      and candidate.transfer.pinned is False and not candidate.handover.on_accelerator)
    main_transfer, main_transfer_spread = ((transfer, candidate.transfer.spread_s) if copies_on_main
                                           else (0.0, 0.0))
    handover = candidate.handover  # 0 s unless the worker is a CPU process
    main_time = (main.curve.time_s(batch_size) * candidate.slowdown + main.optimizer_s + main_transfer
                 + handover.seconds)
    main_uncertainty = (main.curve.uncertainty_s(batch_size) * candidate.slowdown + main.optimizer_spread_s
                        + main_transfer_spread + handover.spread_s)
    budget = (1 - margin) * main_time
    time_of = lambda b: perturbation_time_s(candidate, models, b)  # noqa: E731
    upper = largest_perturbation_batch(candidate, models, batch_size)
    if upper < 1:
        return None
    staleness = max(1, math.ceil(time_of(1) / budget * (1 - _EPS)))
    b_p = largest_batch_within(time_of, staleness * budget, upper)
    while b_p == 0:  # only when rounding put T_pert(1) a hair above s * budget
        staleness += 1
        b_p = largest_batch_within(time_of, staleness * budget, upper)
    return Evaluation(candidate, b_p, staleness, main_time, main_uncertainty, time_of(b_p),
                      pert.curve.uncertainty_s(b_p) + candidate.transfer.spread_s, budget, base)
