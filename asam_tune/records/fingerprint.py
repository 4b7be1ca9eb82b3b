"""The hardware and software fingerprint stored in every profile and plan (no torch import).

Every field that could not be discovered is ``None``; discovery lives in
``asam_tune.fingerprint`` and never crashes.
"""
from __future__ import annotations

from pydantic import Field

from asam_tune.records.base import Record


class CpuInfo(Record):
    model: str | None = None
    physical_cores: int | None = Field(default=None, gt=0)
    logical_cores: int | None = Field(default=None, gt=0)
    # The cores this process may run on (its affinity mask) ...
    affinity: tuple[int, ...] | None = None
    # ... and the cgroup CPU quota in cores (cpu.max), which affinity does not show.
    cgroup_quota_cores: float | None = Field(default=None, gt=0)
    # min(len(affinity), quota) rounded down, at least 1: what a plan may divide.
    usable_cores: int | None = Field(default=None, gt=0)
    memory_bytes: int | None = Field(default=None, gt=0)


class GpuInfo(Record):
    index: int = Field(ge=0)
    name: str | None = None
    uuid: str | None = None
    memory_bytes: int | None = Field(default=None, gt=0)
    pcie_generation: int | None = Field(default=None, gt=0)
    pcie_width: int | None = Field(default=None, gt=0)
    # CPU cores nearest to this GPU (nvmlDeviceGetCpuAffinity); None on MIG slices etc.
    nearest_cores: tuple[int, ...] | None = None
    is_mig: bool | None = None


class Fingerprint(Record):
    cpu: CpuInfo
    gpus: tuple[GpuInfo, ...] = ()
    nvidia_driver: str | None = None
    python_version: str | None = None
    torch_version: str | None = None
    cuda_version: str | None = None
    platform: str | None = None


def fingerprint_differences(expected: Fingerprint, actual: Fingerprint) -> list[str]:
    """What makes two machines different for timing purposes, one phrase per difference.

    Versions of Python and the exact affinity set are not compared: they do not change
    what a device can compute in a step. A field unknown on either side (None) is not a
    difference: a scheduler without torch cannot know the CUDA version. An empty list means
    "the same machine".
    """
    differences: list[str] = []

    def compare(label: str, a: object, b: object) -> None:
        if a is not None and b is not None and a != b:
            differences.append(f"{label}: {a!r} != {b!r}")

    compare("cpu model", expected.cpu.model, actual.cpu.model)
    compare("usable cores", expected.cpu.usable_cores, actual.cpu.usable_cores)
    compare("gpu count", len(expected.gpus), len(actual.gpus))
    for a, b in zip(expected.gpus, actual.gpus):
        compare(f"gpu {a.index} name", a.name, b.name)
    compare("torch version", expected.torch_version, actual.torch_version)
    compare("cuda version", expected.cuda_version, actual.cuda_version)
    return differences
