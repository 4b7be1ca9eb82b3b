"""The torch-free API for training scripts and cluster schedulers.

Reading profiles and plans, planning, and sizing a job's resources import no torch, so a
scheduler (Slurm submit script, Ray driver, Kubernetes operator) can call them cheaply::

    from asam_tune import api
    need = api.cpus_needed("profiles/a100.json", batch_size=256)
    plan = api.plan_for("profiles/a100.json", 256)
    api.resources(plan)  # {"gpus": 1, "cpu_cores": 9, "host_memory_bytes": ..., ...}
"""
from __future__ import annotations

import dataclasses
import os
import warnings

from asam_tune.costmodel.cpus import CpuRequirement
from asam_tune.costmodel.cpus import cpus_needed as _cpus_needed
from asam_tune.costmodel.memory import worker_host_memory_bytes
from asam_tune.costmodel.planner import make_plan
from asam_tune.errors import FingerprintMismatchError, UserInputError
from asam_tune.records.base import dump_record, load_record
from asam_tune.records.fingerprint import Fingerprint, fingerprint_differences
from asam_tune.records.plan import Plan
from asam_tune.records.profile import Profile
from asam_tune.records.rho_rule import RhoRule

__all__ = [
    "CpuRequirement", "Plan", "Profile",
    "check_machine", "cpus_needed", "load_plan", "load_profile", "plan_for", "profile_main_device",
    "ray_resources_per_worker",
    "resources", "save_plan",
]

PathLike = str | os.PathLike


def load_profile(path: PathLike) -> Profile:
    """Read and validate a profile file; ``RecordError`` names the file, JSON path and values."""
    return load_record(Profile, path)


def load_plan(path: PathLike) -> Plan:
    """Read and validate a plan file; ``RecordError`` names the file, JSON path and values."""
    return load_record(Plan, path)


def save_plan(plan: Plan, path: PathLike) -> None:
    """Write ``plan`` atomically (temporary file, fsync, rename)."""
    if not isinstance(plan, Plan):
        raise UserInputError(f"save_plan needs a Plan, got {type(plan).__name__}")
    dump_record(plan, path)


def _profile(profile_or_path: Profile | PathLike) -> Profile:
    if isinstance(profile_or_path, Profile):
        return profile_or_path
    if isinstance(profile_or_path, (str, os.PathLike)):
        return load_profile(profile_or_path)
    raise UserInputError(f"expected a Profile or a path to one, got {type(profile_or_path).__name__}")


def plan_for(profile_or_path: Profile | PathLike, batch_size: int, *, main_device: str | None = None,
             margin: float = 0.05, reserved_cores: int = 0, nproc_per_node: int = 1,
             asynchronous: bool = False, min_perturbation_fraction: float | None | str = "default",
             rho_rule: str | RhoRule = "default") -> Plan:
    """Plan asynchronous SAM for training batch size ``batch_size`` on the profiled machine.

    ``reserved_cores`` are kept per rank for data loading, on top of the main process's own;
    ``nproc_per_node`` ranks share the machine's cores (torchrun). ``asynchronous`` takes the
    best asynchronous split even where synchronous SAM would be faster (noted in the plan).
    ``min_perturbation_fraction`` is the quality floor on b_p / B ("default": the one measured
    for the rho rule; None: no floor); ``rho_rule`` how the runtime scales rho with b_p
    ("default", "none" or a ``RhoRule``). Impossible predictions from a profile measured on a
    busy machine raise ``ImplausiblePlanError``; other doubts are warnings and notes.
    """
    return make_plan(_profile(profile_or_path), batch_size, main_device=main_device, margin=margin,
                     reserved_cores=reserved_cores, nproc_per_node=nproc_per_node, asynchronous=asynchronous,
                     min_perturbation_fraction=min_perturbation_fraction, rho_rule=rho_rule)


def profile_main_device(profile: Profile) -> str:
    """The configuration the profiler measured as the main process: on a CPU-only machine the CPU
    at half the usable cores (what its contention and handover timings are for)."""
    for measured in (*profile.contention, *profile.handovers):
        return measured.main
    return profile.devices[0].config.key


def cpus_needed(profile_or_path: Profile | PathLike, batch_size: int, *, main_device: str | None = None,
                margin: float = 0.05, min_perturbation_batch: int = 1, nproc_per_node: int = 1) -> CpuRequirement:
    """The fewest CPU cores per GPU (per rank) that hide the perturbation, and the b_p they give.

    On a CPU-only profile without ``main_device`` the main process's configuration is the one
    the profiler measured as main (``profile_main_device``); the explanation says which.
    """
    profile = _profile(profile_or_path)
    chosen = None
    if main_device is None and all(d.config.is_cpu for d in profile.devices):
        main_device = chosen = profile_main_device(profile)
    need = _cpus_needed(profile, batch_size, main_device=main_device, margin=margin,
                        min_perturbation_batch=min_perturbation_batch, nproc_per_node=nproc_per_node)
    if chosen is None:
        return need
    return dataclasses.replace(need, explanation=f"{need.explanation} (main process {chosen}: the profile's main "
                                                 f"configuration; pass main_device='cpu/<k>t' for another)")


def resources(plan: Plan) -> dict:
    """What the plan needs from a scheduler, per rank and for the node, as a plain dict."""
    if not isinstance(plan, Plan):
        raise UserInputError(f"resources needs a Plan, got {type(plan).__name__}")
    main_device = plan.main_device.split("/")[0]
    asynchronous = plan.mode != "synchronous"
    pert = plan.perturbation
    cpu_worker = asynchronous and pert.device == "cpu"
    other_accelerator = asynchronous and pert.device != "cpu" and pert.device != main_device
    gpus_per_rank = (main_device != "cpu") + other_accelerator
    cores_per_rank = plan.main_cores + plan.reserved_cores + plan.worker_cores
    memory_per_rank = worker_host_memory_bytes(plan) if cpu_worker else 0
    n = plan.nproc_per_node
    return {
        "nproc_per_node": n,
        "gpus": gpus_per_rank * n,
        "gpus_per_rank": gpus_per_rank,
        "cpu_cores": cores_per_rank * n,
        "cpu_cores_per_rank": cores_per_rank,
        "worker_cores_per_rank": plan.worker_cores,
        "host_memory_bytes": memory_per_rank * n,
        "host_memory_bytes_per_rank": memory_per_rank,
        "perturbation_device": pert.key,
        "mode": plan.mode,
    }


def ray_resources_per_worker(plan: Plan) -> dict:
    """One rank's needs in Ray's vocabulary: ``ScalingConfig(resources_per_worker=...)``.

    (``resources()``'s own keys would read to Ray as custom resources no node has.)
    """
    need = resources(plan)
    return {"CPU": need["cpu_cores_per_rank"], "GPU": need["gpus_per_rank"]}


def check_machine(plan_or_profile: Plan | Profile, *, allow_other_machine: bool = False,
                  current: Fingerprint | None = None) -> list[str]:
    """Compare the record's machine with this one (or ``current``); return the differences.

    A difference raises ``FingerprintMismatchError`` unless ``allow_other_machine``, which
    turns it into a warning.
    """
    if isinstance(plan_or_profile, Plan):
        expected, what = plan_or_profile.profile_fingerprint, "plan"
    elif isinstance(plan_or_profile, Profile):
        expected, what = plan_or_profile.fingerprint, "profile"
    else:
        raise UserInputError(f"check_machine needs a Plan or a Profile, got {type(plan_or_profile).__name__}")
    if current is None:
        from asam_tune.fingerprint import collect_fingerprint  # probes the machine: only when asked

        current = collect_fingerprint()
    differences = fingerprint_differences(expected, current)
    if differences:
        summary = "; ".join(differences)
        if not allow_other_machine:
            raise FingerprintMismatchError(f"this {what} was made on another machine ({summary}); pass "
                                           f"allow_other_machine=True (--allow-other-machine) to use it anyway")
        warnings.warn(f"using a {what} made on another machine: {summary}", stacklevel=2)
    return differences
