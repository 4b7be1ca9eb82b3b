"""Per-step wall-clock with a real worker process: what the in-process accuracy runs cannot time.

The accuracy runs compute the asynchronous methods' ascent in-process (identical math, one
step stale), so their step time is serial. Here each asynchronous method trains a fresh model
for a fixed number of steps with ``perturbation_device="cpu"``: the main process pinned to one
core with one thread, the worker process pinned to another with one thread (the split of
``asam-tune plan --main-device cpu/1t --asynchronous``). SGD and synchronous SAM are timed on
the main core in the same pass, and on every usable core (what a CPU user without a worker
runs), so ratios come from one sitting. The load average is recorded around every method:
this machine is shared, and these times move with it.
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch

from asam_tune.bench.peers_methods import Method, parse_method
from asam_tune.bench.peers_steppers import make_stepper
from asam_tune.bench.peers_tasks import Task
from asam_tune.data import batches
from asam_tune.errors import UserInputError


def _load() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _time_one(task: Task, method: Method, rho: float, steps: int, warmup: int, *,
              perturbation_device: str | None, worker_cores: tuple[int, ...] | None) -> dict:
    split = task.data()
    torch.manual_seed(0)
    model = task.build().train()
    total = steps + warmup
    stepper = make_stepper(task, method, model, rho, seed=0, total_steps=total,
                           perturbation_device=perturbation_device, cores=worker_cores)
    loader = batches(split.x_train, split.y_train, task.batch_size, shuffle=True,
                     generator=torch.Generator().manual_seed(0))
    data = []
    while len(data) < total + 1:
        data.extend(loader)
    times = []
    try:
        for index in range(total):
            tick = time.perf_counter()
            stepper.step(*data[index], data[index + 1])
            if index >= warmup:
                times.append(time.perf_counter() - tick)
        stats = stepper.stats()
    finally:
        stepper.close()
    quartiles = statistics.quantiles(times, n=4)
    # The mean is the throughput (LookSAM and RST alternate cheap and full steps: their median is
    # the cheap one); the median and IQR say how noisy the sitting was.
    return {"step_time_mean_s": statistics.mean(times),
            "step_time_median_s": statistics.median(times), "step_time_iqr_s": quartiles[2] - quartiles[0],
            "steps": len(times), "worker": perturbation_device is not None,
            "wait_median_s": stats.get("wait_median_s"),
            "worker_compute_median_s": stats.get("worker_compute_median_s"),
            "staleness_histogram": stats.get("staleness_histogram")}


def time_with_worker(task: Task, methods: list[str], rho: dict[str, float], *, steps: int = 150, warmup: int = 20,
                     progress: Callable[[str], None] = lambda line: None) -> dict:
    """Median step times: asynchronous methods with a real worker, the rest on the main core alone."""
    from asam_tune.fingerprint import usable_core_ids
    from asam_tune.runtime.placement import place, preserved_placement

    cores = usable_core_ids()
    if len(cores) < 2:
        raise UserInputError(f"timing with a worker process needs 2 usable cores, this machine has {len(cores)}")
    main_core, worker_core = cores[0], cores[1]
    result: dict = {"main_core": main_core, "worker_core": worker_core, "steps": steps, "warmup": warmup,
                    "methods": {}}
    with preserved_placement():
        place(tuple(cores), len(cores))
        for name in ("sgd", "sam"):  # what a CPU user without a worker runs, on every core
            before = _load()
            progress(f"timing {name} on all {len(cores)} cores")
            result[f"{name}_all_cores"] = {**_time_one(task, parse_method(name), rho.get(name, 0.0), steps, warmup,
                                                       perturbation_device=None, worker_cores=None),
                                           "threads": len(cores), "load_before": before, "load_after": _load()}
        place((main_core,), 1)
        for name in methods:
            method = parse_method(name)
            device = "cpu" if method.kind in ("asam", "nonblocking") else None
            progress(f"timing {name} ({'main core + worker core' if device else 'main core'})")
            before = _load()
            timing = _time_one(task, method, rho.get(name, 0.0), steps, warmup, perturbation_device=device,
                               worker_cores=(worker_core,) if device else None)
            result["methods"][name] = {**timing, "load_before": before, "load_after": _load()}
    return result


__all__ = ["time_with_worker"]
