"""The plan: what the cost model decided, the record the runtime and schedulers read (no torch).

Layout (schema_version 2)::

    Plan
      profile_fingerprint, profile_hash   the profile it was made from (and its machine)
      workload                            the model it is for (never imported from here)
      batch_size, main_device, ...        the inputs
      perturbation                        where the ascent gradient is computed
      perturbation_batch_size, mode       how much of the next batch, and how to wait for it
      predictions                         step times of SGD, SAM and asynchronous SAM
      alternatives[]                      the next best choices with their predictions
      verdict, notes[]                    plain-language decision and every assumption made
      rho_rule                            how the runtime scales rho with b_p (records.rho_rule)
      quality                             the quality floor on b_p / B and the gain expected at b_p
      hiding                              full, partial (the main step waits), stale or none
      trade                               the plan that hides fully against the one that keeps the
                                          gain, and which was chosen and why (None: not planned)
      profile_load                        whether the profile was measured on a busy machine
      ascent_dtype                        optional: the autocast dtype the ascent was measured and
                                          is to run in (AsyncSAM's ascent_dtype; absent: the
                                          parameters' dtype)

Version 1 files (no rho_rule, quality, hiding, trade or profile_load) load as they are: they
read as rho_rule "none" and no floor, today's behaviour before version 2, and are written back
(and hashed) exactly as they were. A version-1 document may not carry the version-2 fields.

A plan names devices and numbers only: it never names code to import.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from asam_tune.records.base import Record
from asam_tune.records.fingerprint import Fingerprint
from asam_tune.records.profile import AscentDtype, DeviceConfig, MachineLoad, WorkloadDescriptor
from asam_tune.records.rho_rule import NO_RHO_RULE, RhoRule

PLAN_SCHEMA_VERSION = 2

# staleness1: the paper's algorithm, the worker's result is awaited one step later;
# non_blocking: never wait, apply the newest perturbation (staleness may exceed 1);
# synchronous: plain SAM in-process (the perturbation device cannot beat it).
Mode = Literal["staleness1", "non_blocking", "synchronous"]

# Where a number came from: a profile measurement, an assumption (noted in the plan), or
# nothing to measure (same device, in-process).
Source = Literal["measured", "assumed", "not_applicable"]

# How much of the ascent's time the main step does not see:
# full: the ascent ends within the main step (with the margin): step = T_main;
# partial: staleness 1, but the ascent takes longer: the main step waits for it:
#          step = max(T_main, T_pert + handover) (docs/cost-model.md);
# stale: non-blocking mode: the main step never waits, the perturbation is `staleness` steps old;
# none: synchronous SAM, nothing runs beside the main step.
Hiding = Literal["full", "partial", "stale", "none"]

# estimate: interpolated between measured fractions; at_most: below the smallest measured fraction
# the gain is taken to be no larger than there; unknown: nothing measured to go by.
GainBound = Literal["estimate", "at_most", "unknown"]


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


# The hiding each (mode, feasible) pair means; staleness1 without feasible is partial hiding.
_HIDING_OF = {("staleness1", True): "full", ("staleness1", False): "partial", ("non_blocking", False): "stale",
              ("synchronous", True): "none", ("synchronous", False): "none"}


def _check_mode(mode: str, staleness: int, feasible: bool, perturbation_batch_size: int,
                batch_size: int, hiding: str | None = None) -> None:
    """``hiding`` None: a version-1 record (or an alternative that does not say), where staleness 1
    means fully hidden."""
    if perturbation_batch_size > batch_size:
        raise ValueError(f"perturbation_batch_size {perturbation_batch_size} exceeds batch_size {batch_size}")
    partial = hiding == "partial"
    if mode == "staleness1" and (staleness != 1 or not (feasible or partial)):
        raise ValueError(f"mode 'staleness1' needs staleness 1 and feasible true, got {staleness} and {feasible}")
    if mode == "synchronous" and staleness != 0:
        raise ValueError(f"mode 'synchronous' needs staleness 0, got {staleness}")
    if mode == "non_blocking" and staleness < 1:
        raise ValueError(f"mode 'non_blocking' needs staleness >= 1, got {staleness}")
    if hiding is not None and _HIDING_OF.get((mode, feasible)) != hiding:
        raise ValueError(f"hiding {hiding!r} does not match mode {mode!r} with feasible {str(feasible).lower()}")


class Alternative(Record):
    """Another choice the cost model considered, with its own predictions."""

    omit_when_none = frozenset({"hiding"})

    main_device: str
    perturbation: PerturbationDevice
    perturbation_batch_size: PositiveInt
    mode: Mode
    staleness: NonNegativeInt
    feasible: bool
    predictions: Predictions
    hiding: Hiding | None = None  # None: not said (version 1, or a measured alternative: full)


class ExpectedGain(Record):
    """The share of SAM's accuracy gain over SGD expected at ``b_p / B`` (1: all of it; it may
    exceed 1 where the measurements did), from the cost model's table of measured gains."""

    perturbation_fraction: float = Field(gt=0.0, le=1.0)
    value: NonNegativeFloat | None
    bound: GainBound

    @model_validator(mode="after")
    def _value_matches_bound(self) -> "ExpectedGain":
        if (self.value is None) != (self.bound == "unknown"):
            raise ValueError(f"a gain bound {self.bound!r} needs {'no' if self.bound == 'unknown' else 'a'} value")
        return self


class Quality(Record):
    """The quality floor the plan keeps and the gain it expects at its ``b_p``."""

    # The smallest b_p / B the planner allowed (None: no floor was asked for), and b_p's bound.
    min_perturbation_fraction: float | None = Field(gt=0.0, le=1.0)
    min_perturbation_batch_size: PositiveInt
    floor_source: str
    expected_gain: ExpectedGain
    gain_source: str


class TradeOption(Record):
    """One side of the trade between hiding the ascent and keeping SAM's gain."""

    main_device: str
    perturbation: str  # DeviceConfig.key
    perturbation_batch_size: PositiveInt
    hiding: Hiding
    staleness: NonNegativeInt
    asam_step_s: PositiveFloat
    expected_gain: ExpectedGain


class Trade(Record):
    """The fastest plan that hides fully (no floor) beside the fastest that keeps the floor."""

    hides_fully: TradeOption | None  # None: no device can run the ascent beside the main step
    keeps_gain: TradeOption | None  # None: no floor, or no device can run b_p at the floor
    chosen: Literal["hides_fully", "keeps_gain", "synchronous"]
    reason: str  # one line


class ProfileLoad(Record):
    """How busy the machine was while the profile was measured (``busy`` None: not recorded)."""

    omit_when_none = frozenset({"machine_load"})

    busy: bool | None
    summary: str  # one line
    machine_load: MachineLoad | None = None


# Fields a version-1 plan does not have: it may not carry them, and it is written without them.
_VERSION_2_FIELDS = ("rho_rule", "quality", "hiding", "trade", "profile_load", "ascent_dtype")


class Plan(Record):
    """The cost model's decision for one batch size on one profiled machine."""

    omit_when_none = frozenset({"quality", "hiding", "trade", "profile_load", "ascent_dtype"})
    omit_in_version_1 = frozenset({"rho_rule"})  # its default there

    # 1: before the quality floor and the rho rule; still read, never written by the planner.
    schema_version: Literal[1, 2] = PLAN_SCHEMA_VERSION
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
    # Version 2. The rule the runtime applies to rho at b_p (version 1: "none").
    rho_rule: RhoRule = NO_RHO_RULE
    quality: Quality | None = None
    hiding: Hiding | None = None
    trade: Trade | None = None
    profile_load: ProfileLoad | None = None
    # The ascent's autocast dtype the plan's times assume (from the profile); None: the parameters'.
    ascent_dtype: AscentDtype | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "Plan":
        if self.schema_version == 1:
            carried = [name for name in _VERSION_2_FIELDS if name in self.model_fields_set]
            if carried:
                raise ValueError(f"a version-1 plan has no {', '.join(carried)}; they need schema_version 2")
            if any(a.hiding is not None for a in self.alternatives):
                raise ValueError("a version-1 plan's alternatives have no hiding; it needs schema_version 2")
        else:
            missing = [name for name in ("quality", "hiding", "profile_load") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"a version-2 plan needs {', '.join(missing)}")
        _check_mode(self.mode, self.staleness, self.feasible, self.perturbation_batch_size, self.batch_size,
                    self.hiding)
        for alternative in self.alternatives:
            _check_mode(alternative.mode, alternative.staleness, alternative.feasible,
                        alternative.perturbation_batch_size, self.batch_size, alternative.hiding)
        return self

    @property
    def min_perturbation_batch_size(self) -> int:
        """The smallest b_p the quality floor allows (1 without a floor, and for version-1 plans):
        the bound for anything that changes b_p later (the online adapter, tuning)."""
        return 1 if self.quality is None else self.quality.min_perturbation_batch_size

    @property
    def worker_cores(self) -> int:
        """CPU cores the perturbation worker needs per rank (0 when it runs on an accelerator)."""
        uses_cpu_worker = self.perturbation.device == "cpu" and self.mode != "synchronous"
        return (self.perturbation.threads or 0) if uses_cpu_worker else 0
