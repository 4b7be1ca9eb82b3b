"""Timing whole training steps: SGD, and SAM through ``AsyncSAM``, on the same synthetic batches.

The loops behind the speed benchmark, the plan comparison, the adaptation benchmark and the
trials of ``asam-tune tune``. Each run starts from a fresh copy of the model (seed 0) and
synchronises the device inside the timer; the first ``warmup`` steps are dropped. No data
loading happens inside the timer: the batches are made once and cycled.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch

from asam_tune.runtime import AsyncSAM
from asam_tune.workloads import Workload

DISTINCT_BATCHES = 8  # cycled: enough variety, no data-loading time inside the timer
# A baseline measured this far from the profile's (either way) was not measured on the machine
# the profile describes: a busy machine, or another setting. Far beyond run-to-run noise.
BASELINE_DISAGREEMENT = 2.0


def synthetic_batches(workload: Workload, batch_size: int, count: int, device: torch.device) -> list:
    """``count`` batches on ``device``, cycling ``DISTINCT_BATCHES`` made with a fixed seed."""
    generator = torch.Generator().manual_seed(1234)
    made = [workload.make_batch(batch_size, generator=generator) for _ in range(DISTINCT_BATCHES)]
    made = [(x.to(device), y.to(device)) for x, y in made]
    return [made[i % DISTINCT_BATCHES] for i in range(count)]


def fresh_model(workload: Workload, device: torch.device, lr: float):
    """The workload's model (seed 0) on ``device`` in training mode, and SGD with momentum on it."""
    torch.manual_seed(0)
    model = workload.build().to(device).train()
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def sync_for(device: torch.device) -> Callable[[], None]:
    """What finishes the device's queued work (nothing to do on a CPU)."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def time_sgd(workload: Workload, batches: Iterable, device: torch.device, warmup: int, lr: float) -> list[float]:
    """Seconds per SGD step (zero_grad, forward, backward, step), the first ``warmup`` dropped."""
    model, optimizer = fresh_model(workload, device, lr)
    sync, times = sync_for(device), []
    for x, y in batches:
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        workload.loss_fn(model(x), y).backward()
        optimizer.step()
        sync()
        times.append(time.perf_counter() - started)
    return times[warmup:]


def time_sam(workload: Workload, batches: Iterable, device: torch.device, warmup: int, lr: float,
             rho: float, **sam_options) -> tuple[list[float], dict]:
    """Seconds per ``AsyncSAM.step`` (``sam_options`` go to ``AsyncSAM``), the first ``warmup``
    dropped, and the run's worker statistics as a plain dict."""
    model, optimizer = fresh_model(workload, device, lr)
    sync, times = sync_for(device), []
    with AsyncSAM(model, optimizer, workload.loss_fn, rho, **sam_options) as sam:
        for x, y in sam.lookahead(batches):
            started = time.perf_counter()
            sam.step(x, y)
            sync()
            times.append(time.perf_counter() - started)
        stats = sam.stats()
        timeline = sam.timeline() if sam_options.get("record_timeline") else None
    return times[warmup:], {"wait_median_s": stats.wait_median_s,
                            "worker_compute_median_s": stats.worker_compute_median_s,
                            "staleness_histogram": {str(k): v for k, v in stats.staleness_histogram.items()},
                            "fallbacks": stats.fallbacks, "skipped_perturbations": stats.skipped_perturbations,
                            "b_p_trajectory": [list(entry) for entry in stats.perturbation_batch_size_trajectory],
                            "rho_applied": stats.rho_applied,
                            **({} if timeline is None else {"timeline": timeline})}


def baseline_warning(measured_s: float, predicted_s: float, what: str = "SGD", *,
                     load: tuple[float, ...] | None = None) -> str | None:
    """A warning when a measured baseline step and the profile's prediction of it differ by more
    than ``BASELINE_DISAGREEMENT`` times; None when they agree."""
    if not (measured_s > 0 and predicted_s > 0):
        return None
    ratio = measured_s / predicted_s
    if 1 / BASELINE_DISAGREEMENT <= ratio <= BASELINE_DISAGREEMENT:
        return None
    load_text = f" (1-minute load average now {load[0]:.2f})" if load else ""
    if ratio > 1:
        why = (f"this machine is busier now than when it was profiled{load_text}, or the profile was made "
               "elsewhere: ratios to the plan's predictions mean little; measure again on a quiet machine "
               "or re-profile")
    else:
        why = (f"the profile was measured while the machine was busier{load_text}, or elsewhere: re-profile "
               "on a quiet machine")
    return (f"{what}'s step measured {measured_s * 1e3:.3g} ms here, the profile predicts "
            f"{predicted_s * 1e3:.3g} ms ({ratio:.2f}x): {why}")


def hidden_fraction_warning(hidden: float | None) -> str | None:
    """A warning for a measured hidden fraction (SAM - ASAM) / (SAM - SGD) outside [0, 1]."""
    if hidden is None or 0 <= hidden <= 1:
        return None
    if hidden < 0:
        return (f"hidden fraction {hidden:.2f} < 0: asynchronous SAM measured slower than synchronous SAM; the "
                "worker and the main process competed for cores, or another job ran (see the load average)")
    return (f"hidden fraction {hidden:.2f} > 1: asynchronous SAM measured faster than SGD, which only noise can "
            "do; the steps were too few or the machine was busy")


__all__ = ["BASELINE_DISAGREEMENT", "DISTINCT_BATCHES", "baseline_warning", "fresh_model", "hidden_fraction_warning",
           "sync_for", "synthetic_batches", "time_sam", "time_sgd"]
