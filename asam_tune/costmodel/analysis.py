"""Everything the planner and ``cpus_needed`` derive from a profile at one batch size (no torch):
validated inputs, fitted device models, the main device(s), the baseline and every candidate's
evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from asam_tune.costmodel.candidates import CoreBudget, build_candidates, core_budget
from asam_tune.costmodel.evaluate import Baseline, DeviceModel, Evaluation, baseline, device_models, evaluate
from asam_tune.errors import UserInputError
from asam_tune.records.profile import DeviceConfig, Profile


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_inputs(batch_size: object, margin: object, reserved_cores: object, nproc_per_node: object) -> None:
    if not _is_int(batch_size) or batch_size < 1:
        raise UserInputError(f"Invalid batch size: {batch_size!r} (a positive integer)")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise UserInputError(f"Invalid margin: {margin!r} (a fraction in [0, 1))")
    if not _is_int(reserved_cores) or reserved_cores < 0:
        raise UserInputError(f"Invalid reserved_cores: {reserved_cores!r} (a non-negative integer)")
    if not _is_int(nproc_per_node) or nproc_per_node < 1:
        raise UserInputError(f"Invalid nproc_per_node: {nproc_per_node!r} (a positive integer)")


def select_mains(profile: Profile, models: dict[str, DeviceModel], main_device: str | None,
                 batch_size: int) -> list[DeviceConfig]:
    """The main configuration(s) to consider; several only for a CPU main whose split is free."""
    keys = [d.config.key for d in profile.devices]
    cpu_mains = [m.config for m in models.values() if m.config.is_cpu and m.config.threads]
    if main_device == "cpu" or (main_device is None and not _accelerators(models)):
        if not cpu_mains:
            raise UserInputError(f"no CPU configuration with a thread count and a successful timing; "
                                 f"the profile has {keys}")
        return cpu_mains
    if main_device is None:
        # The fastest accelerator at B, among those the profile saw fit B in memory if any.
        accelerators = _accelerators(models)
        fitting = [m for m in accelerators if m.curve.fits_in_memory(batch_size)] or accelerators
        return [min(fitting, key=lambda m: m.step_s(batch_size)).config]
    if main_device not in keys:
        raise UserInputError(f"unknown main device {main_device!r}; the profile has {keys}")
    if main_device not in models:
        raise UserInputError(f"main device {main_device!r} has no successful timing in the profile")
    config = models[main_device].config
    if config.secondary_stream:
        raise UserInputError(f"main device {main_device!r} is a second stream, not a device to train on")
    return [config]


def _accelerators(models: dict[str, DeviceModel]) -> list[DeviceModel]:
    return [m for m in models.values() if not m.config.is_cpu and not m.config.secondary_stream]


def baseline_model(models: dict[str, DeviceModel], mains: list[DeviceConfig], budget: CoreBudget,
                   batch_size: int) -> DeviceModel:
    """SGD and SAM run on the main accelerator, or, when the main is the CPU, on the fastest
    measured thread count within the free cores at B (normally all of them; fewer where more
    threads do not pay, or where another job inflated some points: a baseline slower than one of
    the split's own configurations would make asynchronous SAM look faster than SGD)."""
    if not mains[0].is_cpu:
        return models[mains[0].key]
    cpus = [m for m in models.values() if m.config.is_cpu and m.config.threads]
    within = [m for m in cpus if m.config.threads <= budget.free]
    if within:
        return min(within, key=lambda m: (m.step_s(batch_size), -m.config.threads))
    return min(cpus, key=lambda m: m.config.threads)


@dataclass
class Analysis:
    profile: Profile
    batch_size: int
    margin: float
    nproc_per_node: int
    models: dict[str, DeviceModel]
    budget: CoreBudget
    mains: list[DeviceConfig]
    base_model: DeviceModel
    base: Baseline
    evaluations: list[Evaluation]
    notes: list[str] = field(default_factory=list)


def analyse(profile: Profile, batch_size: int, *, main_device: str | None = None, margin: float = 0.05,
            reserved_cores: int = 0, nproc_per_node: int = 1) -> Analysis:
    check_inputs(batch_size, margin, reserved_cores, nproc_per_node)
    models = device_models(profile)
    notes = [f"{d.config.key} has no successful timing in the profile and was not considered"
             for d in profile.devices if d.config.key not in models]
    budget = core_budget(profile, reserved_cores, nproc_per_node)
    if not budget.known:
        notes.append(f"the profile does not record the usable cores; assumed {budget.per_rank * nproc_per_node}, "
                     f"the largest measured thread count")
    mains = select_mains(profile, models, main_device, batch_size)
    base_model = baseline_model(models, mains, budget, batch_size)
    base = baseline(base_model, batch_size)
    candidates = build_candidates(profile, mains, set(models), budget, nproc_per_node, batch_size)
    notes.extend(candidates.notes)
    evaluations = [e for e in (evaluate(c, models, batch_size, margin, base) for c in candidates.candidates)
                   if e is not None]
    return Analysis(profile, batch_size, float(margin), nproc_per_node, models, budget, mains, base_model,
                    base, evaluations, notes)
