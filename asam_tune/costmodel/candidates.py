"""Which (main device, perturbation device) pairs a machine offers, and what each pair costs
besides compute: transfers, the handover to a CPU worker process, and the main device's
slowdown while the other one works (no torch).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from asam_tune.errors import UserInputError
from asam_tune.records.plan import Source
from asam_tune.records.profile import DeviceConfig, Profile

# The main process drives an accelerator from one core of its own.
MAIN_PROCESS_CORES_WITH_ACCELERATOR = 1


def device_of(key: str) -> str:
    """'cpu/4t' -> 'cpu', 'cuda:0+stream' -> 'cuda:0'."""
    return key.split("/")[0].split("+")[0]


@dataclass(frozen=True)
class CoreBudget:
    """The CPU cores one rank may divide between its main process, data loading and worker."""

    per_rank: int
    reserved: int
    known: bool  # False: usable cores unknown, the largest measured thread count stood in

    @property
    def free(self) -> int:
        """Cores left for the main process and the worker once data loading is served."""
        return self.per_rank - self.reserved


def core_budget(profile: Profile, reserved_cores: int, nproc_per_node: int) -> CoreBudget:
    usable = profile.fingerprint.cpu.usable_cores
    known = usable is not None
    if usable is None:
        threads = [d.config.threads for d in profile.devices if d.config.is_cpu and d.config.threads]
        usable = max(threads, default=1)
    per_rank = usable // nproc_per_node
    if per_rank < 1:
        raise UserInputError(f"nproc_per_node {nproc_per_node} exceeds the {usable} usable cores of the "
                             f"profiled machine")
    if reserved_cores >= per_rank:
        raise UserInputError(f"reserved_cores {reserved_cores} leaves no core of the {per_rank} per rank")
    return CoreBudget(per_rank, reserved_cores, known)


@dataclass(frozen=True)
class Transfer:
    """Weights to the perturbation device and the perturbation back, in seconds."""

    to_target_s: float
    to_source_s: float
    spread_s: float
    source: Source
    pinned: bool | None = None

    @property
    def total_s(self) -> float:
        return self.to_target_s + self.to_source_s


NO_TRANSFER = Transfer(0.0, 0.0, 0.0, "not_applicable")


@dataclass(frozen=True)
class Handover:
    """The main process's fixed cost per step of using a CPU worker process, in seconds."""

    seconds: float
    spread_s: float
    source: Source
    # The (main, worker) keys of the measurement used: another pair's when this one's is missing.
    measured_for: tuple[str, str] | None = None
    # Measured with the weights on an accelerator: the copy-stream path's waits of the main
    # stream are in it (and, with pageable memory, the copies that block the host).
    on_accelerator: bool = False


NO_HANDOVER = Handover(0.0, 0.0, "not_applicable")


@dataclass(frozen=True)
class Candidate:
    """One way to split the work: the main step on ``main``, the ascent on ``perturbation``."""

    main: DeviceConfig
    perturbation: DeviceConfig
    main_cores: int
    worker_cores: int  # CPU cores of the worker process (0 on an accelerator)
    transfer: Transfer
    slowdown: float  # main forward+backward time while the perturbation runs / alone
    contention: Source
    handover: Handover = NO_HANDOVER  # only a CPU worker process has one

    @property
    def total_cores(self) -> int:
        return self.main_cores + self.worker_cores


@dataclass
class CandidateSet:
    candidates: list[Candidate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def find_transfer(profile: Profile, main: DeviceConfig, perturbation: DeviceConfig) -> Transfer:
    """The measured transfer for this pair: exact keys first, then any of the same devices."""
    if perturbation.secondary_stream and perturbation.device == main.device:
        return NO_TRANSFER  # same memory, same process
    exact = [t for t in profile.transfers if t.source == main.key and t.target == perturbation.key]
    same_devices = [t for t in profile.transfers
                    if device_of(t.source) == main.device and device_of(t.target) == perturbation.device]
    matches = exact or same_devices
    if not matches:
        return Transfer(0.0, 0.0, 0.0, "assumed")
    # A runtime that cares pins its host buffers: prefer the pinned measurement.
    point = sorted(matches, key=lambda t: not t.pinned)[0]
    return Transfer(point.to_target.median_s, point.to_source.median_s,
                    point.to_target.iqr_s + point.to_source.iqr_s, "measured", point.pinned)


def find_handover(profile: Profile, main: DeviceConfig, perturbation: DeviceConfig) -> Handover:
    """The measured handover to a CPU worker: this pair's; else the same main's with another CPU
    worker; else another main's on the same device (another CPU split); else assumed 0."""
    if not perturbation.is_cpu:
        return NO_HANDOVER  # an accelerator's worker is a thread in the main process
    to_cpu = [h for h in profile.handovers if device_of(h.perturbation) == "cpu"]
    exact = [h for h in to_cpu if h.main == main.key and h.perturbation == perturbation.key]
    same_main = [h for h in to_cpu if h.main == main.key]
    same_device = [h for h in to_cpu if device_of(h.main) == main.device]
    matches = exact or same_main or same_device
    if not matches:
        return Handover(0.0, 0.0, "assumed")
    point = matches[0]
    on_accelerator = point.weights_on is not None and device_of(point.weights_on) != "cpu"
    return Handover(point.per_step.median_s, point.per_step.iqr_s, "measured", (point.main, point.perturbation),
                    on_accelerator)


def find_slowdown(profile: Profile, main: DeviceConfig, perturbation: DeviceConfig,
                  batch_size: int) -> tuple[float, Source]:
    """The main device's measured slowdown while ``perturbation`` computes (closest batch size)."""
    points = [c for c in profile.contention if c.main == main.key and c.busy == perturbation.key]
    if not points:
        return 1.0, "assumed"
    closest = min(points, key=lambda c: abs(c.batch_size - batch_size))
    return closest.slowdown, "measured"


def main_cores_of(main: DeviceConfig) -> int:
    return main.threads if main.is_cpu and main.threads else MAIN_PROCESS_CORES_WITH_ACCELERATOR


def build_candidates(profile: Profile, mains: list[DeviceConfig], usable: set[str], budget: CoreBudget,
                     nproc_per_node: int, batch_size: int) -> CandidateSet:
    """Every perturbation device each main configuration can use, within the core budget.

    ``usable`` holds the keys of configurations with at least one successful timing.
    """
    result = CandidateSet()
    configs = [d.config for d in profile.devices if d.config.key in usable]
    accelerators = {c.device for c in configs if not c.is_cpu}
    for main in mains:
        main_cores = main_cores_of(main)
        if main_cores > budget.free:
            continue
        for other in configs:
            candidate = _pair(profile, main, other, main_cores, budget, accelerators, nproc_per_node,
                              batch_size, result.notes)
            if candidate is not None:
                result.candidates.append(candidate)
    return result


def _pair(profile: Profile, main: DeviceConfig, other: DeviceConfig, main_cores: int, budget: CoreBudget,
          accelerators: set[str], nproc_per_node: int, batch_size: int, notes: list[str]) -> Candidate | None:
    if other.is_cpu:
        if other.threads is None or main_cores + other.threads > budget.free:
            return None
        worker_cores = other.threads
    elif other.secondary_stream:
        if other.device != main.device:
            return None
        slowdown, source = find_slowdown(profile, main, other, batch_size)
        if source == "assumed":
            _note_once(notes, f"the second stream on {main.device} was not considered: its contention with "
                              f"the main stream was not measured")
            return None
        return Candidate(main, other, main_cores, 0, NO_TRANSFER, slowdown, source)
    else:
        if other.device == main.device:
            return None
        # Each rank needs its own main accelerator and, for this candidate, its own second one.
        needed = nproc_per_node * (1 if main.is_cpu else 2)
        if len(accelerators) < needed:
            _note_once(notes, f"other accelerators were not considered: {nproc_per_node} rank(s) need "
                              f"{needed}, the machine has {len(accelerators)}")
            return None
        worker_cores = 0
    slowdown, source = find_slowdown(profile, main, other, batch_size)
    return Candidate(main, other, main_cores, worker_cores, find_transfer(profile, main, other), slowdown, source,
                     find_handover(profile, main, other))


def _note_once(notes: list[str], text: str) -> None:
    if text not in notes:
        notes.append(text)
