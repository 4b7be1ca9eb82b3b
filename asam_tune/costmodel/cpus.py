"""How many CPU cores per GPU (per rank) hide the perturbation: what a scheduler requests (no torch)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from asam_tune.costmodel.analysis import analyse
from asam_tune.errors import UserInputError
from asam_tune.records.profile import Profile


@dataclass(frozen=True)
class CpuRequirement:
    """The fewest worker cores that hide the perturbation, or why none do.

    ``cores_per_rank`` adds the main process's cores: the number for Slurm's
    ``--cpus-per-task``, Ray's ``resources_per_worker={"CPU": ...}`` or a Kubernetes request.
    """

    worker_cores: int | None
    cores_per_rank: int | None
    perturbation_batch_size: int | None
    perturbation_device: str | None  # the CPU configuration's key, e.g. 'cpu/4t'
    main_device: str
    explanation: str

    @property
    def feasible(self) -> bool:
        return self.worker_cores is not None

    def as_dict(self) -> dict:
        return asdict(self) | {"feasible": self.feasible}


def cpus_needed(profile: Profile, batch_size: int, *, main_device: str | None = None, margin: float = 0.05,
                min_perturbation_batch: int = 1, nproc_per_node: int = 1) -> CpuRequirement:
    """The fewest CPU cores whose measured configuration hides a b_p >= ``min_perturbation_batch``.

    Only thread counts measured in the profile and fitting the profiled machine's cores per
    rank are considered; ties go to the larger b_p.
    """
    if isinstance(min_perturbation_batch, bool) or not isinstance(min_perturbation_batch, int) \
            or not 1 <= min_perturbation_batch:
        raise UserInputError(f"Invalid min_perturbation_batch: {min_perturbation_batch!r} (a positive integer)")
    if isinstance(batch_size, int) and not isinstance(batch_size, bool) and min_perturbation_batch > batch_size:
        raise UserInputError(f"Invalid min_perturbation_batch: {min_perturbation_batch!r} "
                             f"exceeds batch size {batch_size}")
    analysis = analyse(profile, batch_size, main_device=main_device, margin=margin, nproc_per_node=nproc_per_node)
    if len(analysis.mains) != 1:
        raise UserInputError("on a CPU-only profile cpus_needed needs main_device='cpu/<k>t': the main "
                             "process's thread count decides how fast the worker must be")
    main = analysis.mains[0]
    cpu = [e for e in analysis.evaluations if e.candidate.perturbation.is_cpu]
    hiding = [e for e in cpu if e.hidden and e.perturbation_batch_size >= min_perturbation_batch]
    if hiding:
        best = min(hiding, key=lambda e: (e.candidate.worker_cores, -e.perturbation_batch_size))
        c = best.candidate
        return CpuRequirement(c.worker_cores, c.total_cores, best.perturbation_batch_size, c.perturbation.key,
                              main.key, f"{c.perturbation.key} computes b_p={best.perturbation_batch_size} in "
                              f"{best.perturbation_time_s * 1e3:.3g} ms, within {best.budget_s * 1e3:.3g} ms "
                              f"of the {main.key} step with the margin")
    if not cpu:
        why = (f"no measured CPU configuration fits beside {main.key} in the {analysis.budget.per_rank} cores "
               f"per rank")
    elif any(e.hidden for e in cpu):
        best = max((e for e in cpu if e.hidden), key=lambda e: e.perturbation_batch_size)
        why = (f"no measured CPU configuration hides b_p >= {min_perturbation_batch}: the largest hidden is "
               f"b_p={best.perturbation_batch_size} on {best.candidate.perturbation.key}")
    else:
        closest = min(cpu, key=lambda e: (e.staleness, -e.perturbation_batch_size))
        why = (f"no measured CPU configuration hides even b_p=1 within {closest.budget_s * 1e3:.3g} ms; the "
               f"closest, {closest.candidate.perturbation.key}, would run non-blocking at staleness "
               f"{closest.staleness}")
    return CpuRequirement(None, None, None, None, main.key, why)
