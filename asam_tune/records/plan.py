"""The plan: what the cost model decided, the record the runtime and schedulers read (no torch).

Layout (schema_version 1)::

    Plan
      profile_fingerprint, profile_hash   the profile it was made from (and its machine)
      workload                            the model it is for (never imported from here)
      batch_size, main_device, ...        the inputs
      perturbation                        where the ascent gradient is computed
      perturbation_batch_size, mode       how much of the next batch, and how to wait for it
      predictions                         step times of SGD, SAM and asynchronous SAM
      alternatives[]                      the next best choices with their predictions
      verdict, notes[]                    plain-language decision and every assumption made

A plan names devices and numbers only: it never names code to import.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from asam_tune.records.base import Record
from asam_tune.records.fingerprint import Fingerprint
from asam_tune.records.profile import DeviceConfig, WorkloadDescriptor

PLAN_SCHEMA_VERSION = 1

# staleness1: the paper's algorithm, the worker's result is awaited one step later;
# non_blocking: never wait, apply the newest perturbation (staleness may exceed 1);
# synchronous: plain SAM in-process (the perturbation device cannot beat it).
Mode = Literal["staleness1", "non_blocking", "synchronous"]

# Where a number came from: a profile measurement, an assumption (noted in the plan), or
# nothing to measure (same device, in-process).
Source = Literal["measured", "assumed", "not_applicable"]


class PerturbationDevice(Record):
    """Where the ascent gradient is computed: a device, its threads and cores, or a stream."""

    device: str = Field(pattern=r"^(cpu|cuda:\d+|fake:\w+)$")
    threads: PositiveInt | None = None
    # Core ids to pin the worker to; None leaves the choice to the runtime (several ranks,
    # or a machine whose affinity was unknown).
    cores: tuple[NonNegativeInt, ...] | None = None
    secondary_stream: bool = False
    key: str

    @model_validator(mode="after")
    def _consistent(self) -> "PerturbationDevice":
        expected = DeviceConfig(device=self.device, threads=self.threads,
                                secondary_stream=self.secondary_stream).key
        if self.key != expected:
            raise ValueError(f"key {self.key!r} does not match the device fields ({expected!r})")
        if self.cores is not None and self.threads is not None and len(self.cores) != self.threads:
            raise ValueError(f"{len(self.cores)} cores for {self.threads} threads")
        return self


class Predictions(Record):
    """Predicted step times (seconds) at the plan's batch sizes, and where they came from."""

    sgd_step_s: PositiveFloat
    sam_step_s: PositiveFloat
    asam_step_s: PositiveFloat
    # Main step with contention: forward+backward * slowdown + optimizer step.
    main_time_s: PositiveFloat
    # Perturbation forward+backward at b_p plus both transfers.
    perturbation_time_s: PositiveFloat
    transfer_time_s: NonNegativeFloat
    # (T_SAM - T_ASAM) / (T_SAM - T_SGD): 1 = SGD's cost, 0 = SAM's cost, < 0 = slower than SAM.
    hidden_fraction: float
    speedup_over_sam: PositiveFloat
    contention_slowdown: PositiveFloat
    contention: Source
    transfer: Source
    # From the profile's interquartile ranges (see docs/cost-model.md).
    main_time_uncertainty_s: NonNegativeFloat
    perturbation_time_uncertainty_s: NonNegativeFloat


def _check_mode(mode: str, staleness: int, feasible: bool, perturbation_batch_size: int,
                batch_size: int) -> None:
    if perturbation_batch_size > batch_size:
        raise ValueError(f"perturbation_batch_size {perturbation_batch_size} exceeds batch_size {batch_size}")
    if mode == "staleness1" and (staleness != 1 or not feasible):
        raise ValueError(f"mode 'staleness1' needs staleness 1 and feasible true, got {staleness} and {feasible}")
    if mode == "synchronous" and staleness != 0:
        raise ValueError(f"mode 'synchronous' needs staleness 0, got {staleness}")
    if mode == "non_blocking" and staleness < 1:
        raise ValueError(f"mode 'non_blocking' needs staleness >= 1, got {staleness}")


class Alternative(Record):
    """Another choice the cost model considered, with its own predictions."""

    main_device: str
    perturbation: PerturbationDevice
    perturbation_batch_size: PositiveInt
    mode: Mode
    staleness: NonNegativeInt
    feasible: bool
    predictions: Predictions


class Plan(Record):
    """The cost model's decision for one batch size on one profiled machine."""

    schema_version: Literal[1] = PLAN_SCHEMA_VERSION
    kind: Literal["asam-tune-plan"] = "asam-tune-plan"
    created_at: str
    asam_tune_version: str
    # The machine and the profile the plan was made from.
    profile_fingerprint: Fingerprint
    profile_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    workload: WorkloadDescriptor
    # Bytes of one copy of the parameters (measured transfer size, else count x dtype size).
    parameter_bytes: PositiveInt
    batch_size: PositiveInt
    main_device: str  # DeviceConfig.key in the profile
    # CPU cores the main process computes on (1 to drive an accelerator), per rank.
    main_cores: PositiveInt
    reserved_cores: NonNegativeInt
    nproc_per_node: PositiveInt
    margin: float = Field(ge=0.0, lt=1.0)
    perturbation: PerturbationDevice
    perturbation_batch_size: PositiveInt
    mode: Mode
    # Steps between the weights a perturbation is computed at and the step applying it.
    staleness: NonNegativeInt
    # True when the perturbation is fully hidden inside the main step (with the margin).
    feasible: bool
    verdict: str
    predictions: Predictions
    alternatives: tuple[Alternative, ...] = ()
    notes: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> "Plan":
        _check_mode(self.mode, self.staleness, self.feasible, self.perturbation_batch_size, self.batch_size)
        for alternative in self.alternatives:
            _check_mode(alternative.mode, alternative.staleness, alternative.feasible,
                        alternative.perturbation_batch_size, self.batch_size)
        return self

    @property
    def worker_cores(self) -> int:
        """CPU cores the perturbation worker needs per rank (0 when it runs on an accelerator)."""
        uses_cpu_worker = self.perturbation.device == "cpu" and self.mode != "synchronous"
        return (self.perturbation.threads or 0) if uses_cpu_worker else 0
