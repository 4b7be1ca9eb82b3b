"""The real trial runner: short windows of asynchronous-SAM steps on the user's workload.

Timing is ``asam_tune.steptiming``'s, as the speed benchmark's (same synthetic batches, same
loops, same ``place``): the baseline runs SGD and synchronous SAM where the plan's baseline runs (every core left after the reserved
ones for a CPU main, the main GPU otherwise); each trial pins the main process to its cores,
starts the worker the configuration names and times ``steps`` steps after ``warmup``, and
more until ``min_seconds`` of timed steps have passed (``window.TrialLength``; the baseline
too). The process's affinity and thread count are restored on exit, as a batch-size finder
restores the model (``with WorkloadTrialRunner(...) as runner``).
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable

import torch

from asam_tune.steptiming import DISTINCT_BATCHES, synthetic_batches, time_sam, time_sgd
from asam_tune.errors import UserInputError, WorkerError
from asam_tune.records.plan import Plan
from asam_tune.affinity import can_pin
from asam_tune.runtime.placement import place, preserved_placement
from asam_tune.tune.selection import Measurement
from asam_tune.tune.space import SearchSpace, TrialConfig
from asam_tune.timing import summarize
from asam_tune.tune.study import Baseline
from asam_tune.tune.window import TrialLength, timed_batches
from asam_tune.workloads import Workload

WORKER_TIMEOUT_S = 120.0  # a trial's worker that says nothing for this long failed


def _cores_text(cores: tuple[int, ...]) -> str:
    return ",".join(map(str, cores))


class WorkloadTrialRunner:
    """Measures the baseline and each configuration in this process (a context manager)."""

    def __init__(self, workload: Workload, plan: Plan, space: SearchSpace, usable_core_ids: tuple[int, ...], *,
                 steps: int = 20, warmup: int = 5, rho: float = 0.05, lr: float = 0.01,
                 nearest_cores: tuple[int, ...] = (), min_seconds: float = 0.0,
                 clock: Callable[[], float] = time.perf_counter):
        self.length = TrialLength(steps, warmup, min_seconds)  # checks all three
        self.device = torch.device(space.main_device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserInputError(f"the plan's main device is {plan.main_device} but CUDA is not available here")
        self.workload, self.plan, self.space = workload, plan, space
        self.usable_core_ids = tuple(usable_core_ids)
        self.nearest_cores = tuple(nearest_cores)
        self.steps, self.warmup, self.rho, self.lr = steps, warmup, rho, lr
        self.clock = clock
        # The distinct batches only: each window cycles them for as many steps as it takes.
        self.batches = synthetic_batches(workload, plan.batch_size, DISTINCT_BATCHES, self.device)
        self._placement: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> WorkloadTrialRunner:
        # Restores affinity and threads on exit, and meanwhile the trials' pinning does not make
        # this "another machine" to the plans they run.
        self._placement = preserved_placement()
        self._placement.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._placement is None:
            return
        placement, self._placement = self._placement, None
        placement.__exit__(*exc_info)

    @property
    def _ascent_dtype(self) -> str:
        """The plan's ascent dtype (what the tuned plan will run), for the trials and SAM alike."""
        return getattr(self.plan, "ascent_dtype", None) or "parameters"

    def _window(self):
        """A fresh loader for one timing loop: it ends when the window is long enough."""
        return timed_batches(self.batches, self.length, self.clock)

    def baseline(self) -> Baseline:
        cores = self.space.baseline_cores(self.usable_core_ids, self.nearest_cores)
        place(cores, len(cores))
        sgd = time_sgd(self.workload, self._window(), self.device, self.warmup, self.lr)
        sam, _ = time_sam(self.workload, self._window(), self.device, self.warmup, self.lr, self.rho, staleness=0,
                          ascent_dtype=self._ascent_dtype)
        where = f"{self.device} driven from cores {_cores_text(cores)} ({len(cores)} threads)"
        return Baseline(statistics.median(sgd), statistics.median(sam), where)

    def run(self, config: TrialConfig) -> Measurement:
        main_cores, worker_cores = self.space.placement(config, self.usable_core_ids, self.plan.reserved_cores,
                                                        self.nearest_cores)
        place(main_cores, len(main_cores))
        options: dict = {"perturbation_device": config.worker_device,
                         "perturbation_batch_size": config.perturbation_batch_size, "staleness": 1,
                         "on_worker_failure": "raise", "worker_timeout_s": WORKER_TIMEOUT_S,
                         "ascent_dtype": self._ascent_dtype}
        if config.worker_threads is not None:
            options["threads"] = config.worker_threads
            options["cores"] = worker_cores if can_pin() else None
        try:
            times, stats = time_sam(self.workload, self._window(), self.device, self.warmup, self.lr, self.rho,
                                    **options)
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # an out-of-memory trial must not starve the next one
        if stats["fallbacks"]:
            raise WorkerError(f"the worker failed during the trial ({stats['fallbacks']} fallback(s))")
        # The profiler's median and IQR (no noise flag wanted here).
        summary = summarize(times, noise_threshold=math.inf)
        return Measurement(step_time_s=summary.median_s, step_time_iqr_s=summary.iqr_s,
                           wait_s=stats["wait_median_s"], worker_time_s=stats["worker_compute_median_s"],
                           steps=len(times))
