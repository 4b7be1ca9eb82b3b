"""The profile: what the profiler measured, the record the cost model reads (no torch import).

Layout (schema_version 2)::

    Profile
      fingerprint          the machine (records.fingerprint)
      workload             what was measured: model name, parameter count, shape hash, dtype
      settings             how it was measured: warm-up, minimum time, noise threshold
      devices[]            one per device configuration (a GPU, or the CPU at N threads)
        points[]           one per batch size: ok with timings, or oom, or error
      transfers[]          weights main -> perturbation device, perturbation back
      contention[]         main step alone vs while the perturbation device is busy, and on
                           which cores each ran (main_cores, busy_cores; optional)
      handovers[]          the main process's fixed cost per step of using a CPU worker process
      machine_load         optional: how busy the machine was while it was measured: the 1-, 5-
                           and 15-minute load averages at the start and at the end, the usable
                           cores to compare them with, and the profiler's own share of the end
      points[].busy        optional: why a point's timings are suspect (another job used its
                           cores while it was measured, and again when it was measured again)
      ascent_dtype         optional: the autocast dtype the ascent will run in (AsyncSAM's
                           ``ascent_dtype``), when the profile was asked to measure it
        devices[].ascent_points   then: each perturbation candidate's points again, its
                           forward+backward under autocast to that dtype (what the worker runs)

Version 1 files (no handovers) load as they are: schema_version stays 1, so their content
hash, which plans record, does not change. The optional fields (machine_load, the contention
cores) are left out of the file while unset, so version-2 files written before them keep
their content hash too; a version-1 file may not carry them.
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from asam_tune.dtypes import ASCENT_DTYPE_NAMES
from asam_tune.errors import UserInputError
from asam_tune.records.base import Record
from asam_tune.records.fingerprint import Fingerprint

PROFILE_SCHEMA_VERSION = 2
# The kernel's 1-minute load average decays with this time constant (Linux: every 5 s by
# exp(-5/60)), so processes that kept k cores busy for the last t seconds account for about
# k x (1 - exp(-t/60)) of it.
LOAD_AVERAGE_WINDOW_S = 60.0


class TimingStats(Record):
    """Repeated timings of one operation, in seconds."""

    median_s: PositiveFloat
    iqr_s: NonNegativeFloat
    samples_s: tuple[PositiveFloat, ...] = Field(min_length=1)
    # True when iqr/median exceeded the profile's noise threshold.
    noisy: bool = False


class DeviceConfig(Record):
    """One way of running the model: a GPU, a GPU's second stream, or the CPU at N threads."""

    device: str = Field(pattern=r"^(cpu|cuda:\d+|fake:\w+)$")
    threads: PositiveInt | None = None
    cores: tuple[int, ...] | None = None
    secondary_stream: bool = False

    @property
    def key(self) -> str:
        """Stable name used to refer to this configuration across records: 'cpu/2t', 'cuda:0'."""
        if self.threads is not None:
            return f"{self.device}/{self.threads}t"
        return f"{self.device}+stream" if self.secondary_stream else self.device

    @property
    def is_cpu(self) -> bool:
        return self.device == "cpu"


class BatchPoint(Record):
    # Optional, added later: left out of the file while None (older files keep their hash).
    omit_when_none = frozenset({"busy"})

    batch_size: PositiveInt
    status: Literal["ok", "oom", "error"]
    forward_backward: TimingStats | None = None
    optimizer_step: TimingStats | None = None
    error: str | None = None
    # Why these timings are suspect: measured while another job used the cores (and still so
    # when measured again). None: nothing else was seen running.
    busy: str | None = None

    @model_validator(mode="after")
    def _status_matches_content(self) -> "BatchPoint":
        timed = self.forward_backward is not None and self.optimizer_step is not None
        if self.status == "ok" and not timed:
            raise ValueError("an 'ok' point needs forward_backward and optimizer_step timings")
        if self.status != "ok" and (self.forward_backward or self.optimizer_step):
            raise ValueError(f"a {self.status!r} point carries no timings")
        if self.status == "error" and not self.error:
            raise ValueError("an 'error' point needs its error message")
        if self.busy is not None and self.status != "ok":
            raise ValueError(f"a {self.status!r} point has no timings to flag busy")
        return self


# The dtypes an ascent may run in besides the parameters' own (AsyncSAM's ``ascent_dtype``).
AscentDtype = Literal["bfloat16", "float16"]


def ascent_dtype_name(name: object) -> AscentDtype | None:
    """None, 'bfloat16' or 'float16' from what a user may write ('bf16', 'fp16', 'torch.bfloat16',
    or a torch dtype); anything else is a user error naming the choices."""
    if name is None:
        return None
    text = str(name).strip().lower().removeprefix("torch.")
    if text not in ASCENT_DTYPE_NAMES:
        raise UserInputError(f"unknown ascent dtype {name!r}: expected bfloat16 or float16 (or None for the "
                             f"parameters' dtype)")
    return ASCENT_DTYPE_NAMES[text]  # type: ignore[return-value]


class DeviceProfile(Record):
    # Optional, added later: left out of the file while None (older files keep their hash).
    omit_when_none = frozenset({"ascent_points"})

    config: DeviceConfig
    points: tuple[BatchPoint, ...]
    # The same sweep with forward+backward under autocast to the profile's ``ascent_dtype``:
    # what this configuration takes as the perturbation device. None: not measured.
    ascent_points: tuple[BatchPoint, ...] | None = None

    def ok_points(self) -> list[BatchPoint]:
        return sorted((p for p in self.points if p.status == "ok"), key=lambda p: p.batch_size)

    def ascent_ok_points(self) -> list[BatchPoint]:
        return sorted((p for p in self.ascent_points or () if p.status == "ok"), key=lambda p: p.batch_size)


class TransferPoint(Record):
    """Copying the model's parameters from ``source`` to ``target`` and a same-sized tensor back."""

    source: str  # DeviceConfig.key of the main device
    target: str  # DeviceConfig.key of the candidate perturbation device
    parameter_bytes: PositiveInt
    pinned: bool
    to_target: TimingStats
    to_source: TimingStats


class ContentionPoint(Record):
    """The main device's step time alone and while ``busy`` computes at the same time."""

    # The cores are optional (older files lack them): the keys do not say which cores were used,
    # and on a CPU-only machine the main and busy probes are on different ones.
    omit_when_none = frozenset({"main_cores", "busy_cores"})

    main: str  # DeviceConfig.key
    busy: str  # DeviceConfig.key
    batch_size: PositiveInt
    main_alone: TimingStats
    main_while_busy: TimingStats
    main_cores: tuple[NonNegativeInt, ...] | None = None  # None: not pinned (a GPU) or not recorded
    busy_cores: tuple[NonNegativeInt, ...] | None = None

    @property
    def slowdown(self) -> float:
        return self.main_while_busy.median_s / self.main_alone.median_s


class HandoverPoint(Record):
    """What one step of a CPU worker process costs the main process: submit (weights and a few
    input rows into shared memory, the job message), collect of a result already there (pipe,
    copy out), keep-clean/perturb/restore.

    ``weights_on``: where the weights were. On a GPU (the main device) the point is what the
    main stream and its host thread wait for on the runtime's copy-stream path, the gather and
    the result's copy up included; the copies to and from the host on the worker's side are the
    transfers. None (profiles before it was recorded): CPU weights, the transfers apart.
    """

    omit_when_none = frozenset({"weights_on"})

    main: str  # DeviceConfig.key of the main device
    perturbation: str  # DeviceConfig.key of the CPU worker configuration
    per_step: TimingStats
    weights_on: str | None = Field(default=None, pattern=r"^(cpu|cuda:\d+|fake:\w+)$")

    @model_validator(mode="after")
    def _weights_on_the_main_device(self) -> "HandoverPoint":
        main_device = self.main.split("/")[0].removesuffix("+stream")
        if self.weights_on is not None and self.weights_on != main_device:
            raise ValueError(f"weights_on {self.weights_on!r} is not the main device of {self.main!r}")
        return self


LoadAverages = tuple[NonNegativeFloat, NonNegativeFloat, NonNegativeFloat]


class MachineLoad(Record):
    """How busy the machine was while it was profiled: ``os.getloadavg()`` (1-, 5- and 15-minute
    load averages) when measuring started and when it ended; None where the system has none.

    The end includes the profiler's own processes; ``profiler_busy_cores`` (their CPU time over
    the ``elapsed_s`` of measuring) gives how much (``own_share_at_end``).
    """

    start: LoadAverages | None
    end: LoadAverages | None
    usable_cores: PositiveInt  # what the load averages compare with (fingerprint.cpu.usable_cores)
    elapsed_s: NonNegativeFloat | None = None
    profiler_busy_cores: NonNegativeFloat | None = None

    def own_share_at_end(self) -> float:
        """About how much of the end's 1-minute load average the profiler itself caused."""
        if self.elapsed_s is None or self.profiler_busy_cores is None:
            return 0.0
        return self.profiler_busy_cores * (1.0 - math.exp(-self.elapsed_s / LOAD_AVERAGE_WINDOW_S))


class WorkloadDescriptor(Record):
    name: str  # built-in name, or the 'package.module:factory' string it came from
    input_shape: tuple[PositiveInt, ...]
    num_classes: PositiveInt
    parameter_count: PositiveInt
    parameter_shapes_hash: str
    dtype: str


class ProfileSettings(Record):
    warmup: int = Field(ge=0)
    min_time_s: PositiveFloat
    min_repeats: PositiveInt
    noise_threshold: PositiveFloat
    quick: bool = False


class Profile(Record):
    omit_when_none = frozenset({"machine_load", "ascent_dtype"})
    omit_in_version_1 = frozenset({"handovers"})  # empty there (validated)

    # 1: before handovers were measured; still read, never written.
    schema_version: Literal[1, 2] = PROFILE_SCHEMA_VERSION
    kind: Literal["asam-tune-profile"] = "asam-tune-profile"
    created_at: str
    asam_tune_version: str
    fingerprint: Fingerprint
    workload: WorkloadDescriptor
    settings: ProfileSettings
    devices: tuple[DeviceProfile, ...]
    transfers: tuple[TransferPoint, ...] = ()
    contention: tuple[ContentionPoint, ...] = ()
    handovers: tuple[HandoverPoint, ...] = ()
    machine_load: MachineLoad | None = None  # None: not recorded (a profile written before it was)
    # The ascent's autocast dtype the devices' ascent_points were measured in (None: the
    # parameters' dtype, as the points themselves).
    ascent_dtype: AscentDtype | None = None

    @model_validator(mode="after")
    def _version_2_fields_need_version_2(self) -> "Profile":
        with_ascent = [d.config.key for d in self.devices if d.ascent_points is not None]
        if with_ascent and self.ascent_dtype is None:
            raise ValueError(f"{with_ascent[0]} has ascent_points but the profile has no ascent_dtype")
        if self.schema_version != 1:
            return self
        if self.ascent_dtype is not None:
            raise ValueError("a version-1 profile has no ascent_dtype; it needs schema_version 2")
        if self.handovers:
            raise ValueError("a version-1 profile has no handovers; handovers need schema_version 2")
        if self.machine_load is not None:
            raise ValueError("a version-1 profile has no machine_load; machine_load needs schema_version 2")
        if any(c.main_cores is not None or c.busy_cores is not None for c in self.contention):
            raise ValueError("a version-1 profile has no contention cores; main_cores and busy_cores need "
                             "schema_version 2")
        if any(p.busy is not None for d in self.devices for p in d.points):
            raise ValueError("a version-1 profile has no busy flags; busy points need schema_version 2")
        return self

    def busy_points(self) -> list[tuple[str, BatchPoint]]:
        """(configuration key, point) of every point flagged as measured on a busy machine."""
        return [(d.config.key, p) for d in self.devices for p in d.points if p.busy is not None]

    def device(self, key: str) -> DeviceProfile:
        for entry in self.devices:
            if entry.config.key == key:
                return entry
        raise KeyError(f"no device configuration {key!r} in profile; have {[d.config.key for d in self.devices]}")
