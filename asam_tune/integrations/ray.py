"""Asynchronous SAM inside a Ray Train worker: the main step and the CPU worker share the CPUs Ray gave it.

Ray gives a training worker a *number* of CPUs, not cores: it sets ``OMP_NUM_THREADS`` to that
number and leaves the affinity mask alone (the whole node, unless Ray itself runs in a
cpuset). Left as it is, the main step's threads take every CPU and the perturbation worker's
thread competes with them; pinning to a plan's absolute core numbers could land on cores
another trainer on the node is using. ``placement()``, called first thing in
``train_loop_per_worker``:

- counts the CPUs this worker may use: Ray's assigned ``CPU`` (rounded down, at least 1), never
  more than the cores in ``os.sched_getaffinity(0)``;
- gives the CPU worker its threads (the argument, else the plan's, else 1) and the data-loading
  reserve of a plan, and the main step the rest (``torch.set_num_threads``);
- returns the ``AsyncSAM`` keywords ``threads`` and ``cores``, ``cores`` being this process's
  own affinity mask: the worker stays inside what Ray's worker was given, and no absolute core
  of the node is chosen. (With several ranks on a node, this also replaces ``AsyncSAM``'s own
  division of the node's cores, which assumes the node is the job's alone.)

    with AsyncSAM(model, optimizer, loss_fn, plan=plan, **placement(plan)) as sam: ...
"""
from __future__ import annotations

import math
import os
from typing import Any

from asam_tune.errors import UserInputError

try:
    import ray
except ImportError:
    raise ImportError('asam_tune.integrations.ray needs Ray Train: pip install "asam-tune[ray]"') from None

__all__ = ["assigned_cpus", "placement"]


def assigned_cpus() -> int:
    """The CPUs this Ray worker may use: Ray's ``CPU`` resource, capped by the affinity mask."""
    if not ray.is_initialized():
        raise UserInputError("asam_tune.integrations.ray.placement() runs inside a Ray Train worker "
                             "(train_loop_per_worker), but Ray is not initialised in this process")
    resources = ray.get_runtime_context().get_assigned_resources()
    mask = _allowed()
    given = resources.get("CPU")
    cpus = len(mask) if not given else max(1, math.floor(given))
    return min(cpus, len(mask))


def _allowed() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _plan_settings(plan: Any) -> Any:
    from asam_tune.records.plan import Plan
    from asam_tune.runtime import options

    if plan is None:
        return options.PlanSettings()
    if isinstance(plan, (str, os.PathLike)):
        if not os.path.isabs(plan):
            raise UserInputError(f"plan path {os.fspath(plan)!r} is relative, and Ray runs train_loop_per_worker in "
                                 f"its own working directory ({os.getcwd()}): load the plan in the driver "
                                 "(api.load_plan) and pass the Plan, or pass an absolute path")
        from asam_tune.records import load_record

        plan = load_record(Plan, plan)
    if not isinstance(plan, Plan):
        raise UserInputError(f"placement() needs a Plan, its absolute path or None, got {type(plan).__name__}")
    return options.settings_from_plan(plan)


def placement(plan: Any = None, *, perturbation_device: str | None = None,
              worker_threads: int | None = None) -> dict[str, Any]:
    """Set the main step's threads for this Ray worker and return ``AsyncSAM``'s ``threads`` and ``cores``.

    ``plan``: a Plan (or an absolute path), or None. ``perturbation_device``: as ``AsyncSAM``'s
    (default the plan's); only a CPU worker gets threads and cores, otherwise ``{}`` is returned
    and the main step gets all the CPUs less the plan's data-loading reserve.
    """
    import torch

    from asam_tune.runtime import options

    settings = _plan_settings(plan)
    spec = perturbation_device if perturbation_device is not None else settings.device
    # Only whether the worker is a CPU process matters here; AsyncSAM reads (and checks) a GPU
    # device relative to the model's own when it is built.
    cpu_worker = isinstance(spec, (str, torch.device)) and str(spec).strip().lower() == "cpu"
    cpus = assigned_cpus()
    threads = options.positive_int("worker_threads", worker_threads)
    if threads is None:
        threads = (settings.threads if settings.device == "cpu" else None) or 1
    used_by_others = settings.reserved_cores + (threads if cpu_worker else 0)
    if cpu_worker and used_by_others >= cpus:
        raise UserInputError(f"this Ray worker has {cpus} CPU(s), too few for a CPU perturbation worker of {threads} "
                             f"thread(s) beside the main step (and {settings.reserved_cores} reserved): ask Ray for "
                             "more (ScalingConfig(resources_per_worker=api.ray_resources_per_worker(plan)))")
    torch.set_num_threads(max(1, cpus - used_by_others))
    if not cpu_worker:
        return {}
    from asam_tune import affinity

    if not affinity.can_pin():  # macOS: no affinity to keep the worker in; threads only
        return {"threads": threads}
    return {"threads": threads, "cores": tuple(_allowed())}
