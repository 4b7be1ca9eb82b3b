"""Step costs beside the accuracies: what the cost model predicts, and the worker-budget model.

Two kinds of numbers, never mixed:

1. ``predicted_step_s``: the cost model's step time for asynchronous SAM at a given ``b_p`` on a
   profiled machine (a shipped profile, main process on one core, worker on another), with the
   formulas of ``asam_tune.costmodel.evaluate`` -- the main step carries the contention slowdown
   and the handover, the ascent of ``b_p`` samples its own time -- and partial hiding: the step
   is ``max(T_main, T_pert(b_p))`` when the worker is late (the planner only considers ``b_p``
   that hide; here every ``b_p`` the benchmark trains with gets a prediction).

2. ``budget_cost``: a worker that processes a fraction ``beta`` of the batch per main step
   (``beta = 1/32`` stands for a GPU main step about 30x faster than one CPU core). Costs are
   in main steps of SGD (1.0 = SGD's step), with ``phi`` the share of SGD's step that is
   forward+backward (the rest is the optimizer step); one extra forward costs ``phi / 3``. The
   main device is assumed saturated: work added to it costs its share of time (no overlap
   gain from a second stream).
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

from asam_tune.bench.peers_methods import Method, samples
from asam_tune.errors import UserInputError

MAIN_KEY = "cpu/1t"  # the benchmarks' split: main process on one core, the worker on another
WORKER_KEY = "cpu/1t"


def profile_prediction(profile_path: str | Path, batch_size: int):
    """A callable ``b_p -> predicted seconds per step`` and the baselines, from a profile file."""
    from asam_tune import api
    from asam_tune.costmodel.analysis import analyse

    profile = api.load_profile(profile_path)
    analysis = analyse(profile, batch_size, main_device=MAIN_KEY)
    matches = [e for e in analysis.evaluations if e.candidate.perturbation.key == WORKER_KEY]
    if not matches:
        raise UserInputError(f"{profile_path}: no {MAIN_KEY} main with a {WORKER_KEY} worker in this profile")
    evaluation = matches[0]
    candidate = evaluation.candidate
    pert = analysis.models[candidate.perturbation.key]
    slowdown = candidate.slowdown  # both on the CPU: the worker slows as the main does

    def step_s(b_p: int) -> float:
        ascent = pert.curve.time_s(b_p) * slowdown + candidate.transfer.total_s
        return max(evaluation.main_time_s, ascent)

    main_model = analysis.models[MAIN_KEY]
    baselines = {
        "sgd_step_s": main_model.step_s(batch_size),
        "sam_step_s": 2 * main_model.curve.time_s(batch_size) + main_model.optimizer_s,
        "sgd_all_cores_step_s": analysis.base.sgd_step_s,  # what a CPU user without a worker runs
        "sam_all_cores_step_s": analysis.base.sam_step_s,
        "all_cores": analysis.base.config.key,
        "main_time_s": evaluation.main_time_s,
        "hidden_b_p": evaluation.perturbation_batch_size,
        "forward_backward_share": main_model.curve.time_s(batch_size) / main_model.step_s(batch_size),
        "profile": str(Path(profile_path).name),
    }
    return step_s, baselines


def budget_cost(method: Method, batch_size: int, beta: Fraction, phi: float) -> float | None:
    """Step cost in SGD steps when the worker processes ``beta * B`` samples per main step."""
    kind = method.kind
    B = batch_size
    if kind == "sgd":
        return 1.0
    if kind in ("sam", "po-sam"):
        return 1.0 + phi
    if kind == "looksam":
        return 1.0 + phi / method.k
    if kind == "rst":
        return 1.0 + phi * method.probability
    if kind == "mesa":
        return 1.0 + phi / 3
    if kind == "sync":
        return 1.0 + phi * samples(method.fraction, B) / B
    if kind == "asam":
        # Partial hiding: a late worker makes the main step wait for it.
        return max(1.0, float(Fraction(samples(method.fraction, B), B) / beta))
    if kind == "nonblocking":
        return 1.0  # never waits; its staleness is what it pays
    if kind == "split":
        worker = max(1.0, float(Fraction(samples(method.fraction, B), B) / beta))
        return worker + phi * samples(method.main_fraction, B) / B
    return None


def hidden_samples(batch_size: int, beta: Fraction, margin: float = 0.05) -> int:
    """The largest b_p the budget hides within one main step, with the planner's default margin."""
    return max(1, int((1 - margin) * beta * batch_size))


__all__ = ["profile_prediction", "budget_cost", "hidden_samples", "MAIN_KEY", "WORKER_KEY"]
