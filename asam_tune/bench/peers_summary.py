"""From the runs of every method to the numbers the peers tables show (no training here).

Definitions:
- gain fraction: (method - SGD) / (SAM - SGD) on mean test accuracy, SAM at its own chosen rho;
- time to a level (SGD's final mean test accuracy, and SGD + 0.9 (SAM - SGD)): per seed, the
  epochs until the end of the first epoch whose test accuracy reaches it; from those, the
  training time of the accuracy runs (evaluation excluded; seeds that never reach it are
  counted apart), the time at the step measured in the timing pass (a real worker process for
  the asynchronous methods), and the modelled cost in SGD steps;
- the modelled cost: ``peers_cost.budget_cost`` in SGD steps per step.
"""
from __future__ import annotations

import statistics
from fractions import Fraction

from asam_tune.bench.peers_cost import budget_cost, profile_prediction
from asam_tune.bench.peers_methods import Method
from asam_tune.bench.peers_tasks import PROFILES, Task

GAIN_LEVEL = 0.9  # the second time-to-accuracy level: SGD + 0.9 (SAM - SGD)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def epochs_to_reach(curve: list[float], target: float) -> int | None:
    """1-based epoch at whose end the curve first reaches ``target``; None if never."""
    for epoch, value in enumerate(curve, 1):
        if value >= target - 1e-12:
            return epoch
    return None


def timed_step(timed: dict) -> float:
    """Seconds per step from the timing pass: the mean (throughput), the median in older results."""
    return timed.get("step_time_mean_s", timed["step_time_median_s"])


def _time_to(method_runs: list[dict], level: float, steps_per_epoch: int, cost: float | None,
             timed: dict | None) -> dict:
    """Epochs per seed to reach ``level``, and the time that took three ways (see the module docstring)."""
    reached = [epochs_to_reach(r["test_curve"], level) for r in method_runs]
    needed = [e for e in reached if e is not None]
    times = [sum(r["epoch_times_s"][:e]) for r, e in zip(method_runs, reached) if e is not None]
    mean_epochs = statistics.mean(needed) if needed else None
    return {
        "level": level, "epochs": reached, "seeds_reaching": len(needed),
        "accuracy_runs_s": statistics.mean(times) if times else None,
        "timed_s": (mean_epochs * steps_per_epoch * timed_step(timed)
                    if mean_epochs is not None and timed else None),
        "budget_sgd_steps": mean_epochs * steps_per_epoch * cost if mean_epochs is not None and cost else None,
    }


def _profile_predictions(task: Task):
    path = PROFILES / task.profile if task.profile else None
    if path is None or not path.exists():
        return None, {"missing": str(path.name) if path else None}
    return profile_prediction(path, task.batch_size)


def summarize(task: Task, methods: list[Method], runs: dict[str, list[dict]], selections: dict[str, dict],
              timing: dict | None, *, beta: Fraction, epochs: int) -> dict:
    predict, baselines = _profile_predictions(task)
    phi = baselines.get("forward_backward_share", 1.0)
    sgd = runs.get("sgd")
    sam = runs.get("sam")
    sgd_mean = statistics.mean(r["test_accuracy"] for r in sgd) if sgd else None
    sam_mean = statistics.mean(r["test_accuracy"] for r in sam) if sam else None
    steps_per_epoch = next(iter(runs.values()))[0]["steps"] // epochs
    rows = {}
    for method in methods:
        method_runs = runs[method.name]
        tests = [r["test_accuracy"] for r in method_runs]
        mean, sd = _mean_sd(tests)
        row = {
            "kind": method.kind, "asynchronous": method.asynchronous,
            "rho": selections.get(method.name, {}).get("rho"),
            "perturbation_batch_size": method.perturbation_batch_size(task.batch_size),
            "main_ascent_samples": method.main_ascent_samples(task.batch_size),
            "ascent_fraction": float(method.ascent_fraction()),
            "test_accuracy": tests, "test_mean": mean, "test_sd": sd,
            "val_accuracy": [r["val_accuracy"] for r in method_runs],
            "train_accuracy_mean": statistics.mean(r["train_accuracy"] for r in method_runs),
            "memorized_flipped_mean": statistics.mean(r["memorized_flipped"] for r in method_runs),
            "step_time_median_s": statistics.median(r["step_time_median_s"] for r in method_runs),
            "epoch_time_median_s": statistics.median(t for r in method_runs for t in r["epoch_times_s"]),
            "train_time_mean_s": statistics.mean(r["train_time_s"] for r in method_runs),
            "test_curve_mean": [statistics.mean(c) for c in zip(*(r["test_curve"] for r in method_runs))],
            "epoch_time_mean_s": [statistics.mean(c) for c in zip(*(r["epoch_times_s"] for r in method_runs))],
        }
        if sgd_mean is not None and sam_mean is not None and sam_mean != sgd_mean:
            row["gain_fraction"] = (mean - sgd_mean) / (sam_mean - sgd_mean)
        cost = budget_cost(method, task.batch_size, beta, phi)
        row["budget_cost"] = cost
        timed = (timing or {}).get("methods", {}).get(method.name)
        if timed:
            row["worker_timing"] = timed
        row["time_to"] = {}
        for level_name, level in (("sgd", sgd_mean), ("gain90", None if sgd_mean is None or sam_mean is None
                                                       else sgd_mean + GAIN_LEVEL * (sam_mean - sgd_mean))):
            if level is not None:
                row["time_to"][level_name] = _time_to(method_runs, level, steps_per_epoch, cost, timed)
        if predict is not None and method.kind in ("asam", "nonblocking"):
            row["predicted_step_s"] = predict(method.perturbation_batch_size(task.batch_size))
        rows[method.name] = row
    return {
        "task": task.name, "description": task.description, "epochs": epochs, "batch_size": task.batch_size,
        "steps_per_epoch": steps_per_epoch, "seeds": len(next(iter(runs.values()))),
        "beta": str(beta), "forward_backward_share": phi, "profile_baselines": baselines,
        "sgd_test_mean": sgd_mean, "sam_test_mean": sam_mean,
        "selections": selections, "methods": rows, "timing": timing,
        "run_keys": {name: [f"seed {r['seed']}, rho {r['rho']}" for r in rs] for name, rs in runs.items()},
    }


__all__ = ["summarize", "epochs_to_reach", "timed_step"]
