"""The step-time formulas: SGD and SAM baselines, and one candidate's b_p and predictions (no torch).

    T_main(B)   = fwd_bwd_main(B) * slowdown + opt_main + transfers_main + handover
    T_pert(b)   = fwd_bwd_pert(b) * slowdown_pert + transfer_to + transfer_back
    budget      = (1 - margin) * T_main(B)
    b_p         = the largest b <= B (and below the device's OOM) with T_pert(b) <= budget
    T_SGD       = fwd_bwd_base(B) + opt_base;   T_SAM = 2 * fwd_bwd_base(B) + opt_base
    T_ASAM      = T_main(B) when hidden (and in non-blocking mode, which never waits)

transfers_main = transfer_to + transfer_back when the main device is an accelerator and the
worker the CPU: the main thread copies the weights to host memory before the job starts and
the perturbation back after it ends, so both copies lie on the main step's path (and on the
worker's, which cannot start before the first); 0 otherwise.

handover is the main process's fixed cost per step of using a CPU worker process (submit,
collect, keep/perturb/restore; the profile's HandoverPoint, see candidates.find_handover); 0
for an accelerator's worker. Being on the main step's path it lengthens T_main, and with it
the budget.

slowdown_pert is the measured slowdown too when main and perturbation both compute on the CPU
(they share its memory bandwidth and caches, so the busy worker slows as the main does), and
1 for an accelerator.

When even b = 1 does not fit, the staleness is s = ceil(T_pert(1) / budget) and b_p is the
largest b with T_pert(b) <= s * budget (non-blocking mode).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from asam_tune.costmodel.candidates import Candidate
from asam_tune.costmodel.curves import TimeCurve, fit_time_curve, optimizer_step_spread_s, optimizer_step_time_s
from asam_tune.records.profile import DeviceConfig, Profile

# Relative slack when comparing times: exact hand-computed boundaries count as fitting.
_EPS = 1e-9


@dataclass(frozen=True)
class DeviceModel:
    config: DeviceConfig
    curve: TimeCurve
    optimizer_s: float
    optimizer_spread_s: float

    def step_s(self, batch: int) -> float:
        """One SGD step on this configuration alone."""
        return self.curve.time_s(batch) + self.optimizer_s


def device_models(profile: Profile) -> dict[str, DeviceModel]:
    """A fitted model for every configuration with at least one successful timing."""
    return {d.config.key: DeviceModel(d.config, fit_time_curve(d), optimizer_step_time_s(d),
                                      optimizer_step_spread_s(d))
            for d in profile.devices if d.ok_points()}


@dataclass(frozen=True)
class Baseline:
    """SGD and synchronous SAM on ``config`` (the main GPU, or every free core of the CPU)."""

    config: DeviceConfig
    forward_backward_s: float
    sgd_step_s: float
    sam_step_s: float


def baseline(model: DeviceModel, batch_size: int) -> Baseline:
    forward_backward = model.curve.time_s(batch_size)
    return Baseline(model.config, forward_backward, forward_backward + model.optimizer_s,
                    2 * forward_backward + model.optimizer_s)


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

    @property
    def hidden(self) -> bool:
        return self.staleness == 1

    @property
    def asam_step_s(self) -> float:
        # Hidden: max(T_main, T_pert) = T_main. Non-blocking: the main step never waits.
        return self.main_time_s

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


def evaluate(candidate: Candidate, models: dict[str, DeviceModel], batch_size: int, margin: float,
             base: Baseline) -> Evaluation | None:
    """Predictions for one candidate; None when it cannot run a single sample (out of memory)."""
    main = models[candidate.main.key]
    pert = models[candidate.perturbation.key]
    transfer = candidate.transfer.total_s
    # The runtime copies to and from a CPU worker's shared memory on the main thread.
    copies_on_main = not candidate.main.is_cpu and candidate.perturbation.is_cpu
    main_transfer, main_transfer_spread = ((transfer, candidate.transfer.spread_s) if copies_on_main
                                           else (0.0, 0.0))
    handover = candidate.handover  # 0 s unless the worker is a CPU process
    main_time = (main.curve.time_s(batch_size) * candidate.slowdown + main.optimizer_s + main_transfer
                 + handover.seconds)
    main_uncertainty = (main.curve.uncertainty_s(batch_size) * candidate.slowdown + main.optimizer_spread_s
                        + main_transfer_spread + handover.spread_s)
    budget = (1 - margin) * main_time
    # Two CPU processes slow each other alike; a GPU main leaves the CPU worker's speed alone.
    pert_slowdown = candidate.slowdown if candidate.main.is_cpu and candidate.perturbation.is_cpu else 1.0
    time_of = lambda b: pert.curve.time_s(b) * pert_slowdown + transfer  # noqa: E731
    memory_limit = pert.curve.largest_fitting_batch
    upper = batch_size if memory_limit is None else min(batch_size, memory_limit)
    if upper < 1:
        return None
    staleness = max(1, math.ceil(time_of(1) / budget * (1 - _EPS)))
    b_p = largest_batch_within(time_of, staleness * budget, upper)
    while b_p == 0:  # only when rounding put T_pert(1) a hair above s * budget
        staleness += 1
        b_p = largest_batch_within(time_of, staleness * budget, upper)
    return Evaluation(candidate, b_p, staleness, main_time, main_uncertainty, time_of(b_p),
                      pert.curve.uncertainty_s(b_p) + candidate.transfer.spread_s, budget, base)
