"""Discover the machine a profile is measured on: CPU, cgroup quota, GPUs, versions (no torch).

Every probe is guarded on its own: a probe that fails leaves its field ``None`` (or ``gpus``
empty) and discovery never raises. The outside world (pynvml, psutil, /proc and /sys paths,
the affinity call) is injectable so that every fallback is tested with fakes.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import math
import os
import platform
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from asam_tune.records.fingerprint import CpuInfo, Fingerprint, GpuInfo

__all__ = [
    "collect_fingerprint",
    "placed_by_asam_tune",
    "remember_affinity_before_pinning",
    "usable_cores",
    "usable_core_ids",
    "cgroup_quota_cores",
    "cores_from_bitmask",
    "parse_visible_devices",
    "uuid_prefixes_to_ordinals",
]

DEFAULT_CPUINFO = "/proc/cpuinfo"
DEFAULT_CGROUP_ROOT = "/sys/fs/cgroup"
DEFAULT_SELF_CGROUP = "/proc/self/cgroup"

# NVML's CPU masks are arrays of C unsigned longs: 64 bits each on the 64-bit Linux it supports.
_MASK_WORD_BITS = 64
# /proc/cpuinfo keys naming the CPU, most specific first. x86 and some ARM boards have
# "model name"; older ARM kernels "Hardware" or "Processor" (capitalised: lowercase
# "processor" is the core index); POWER has "cpu".
_CPUINFO_MODEL_KEYS = ("model name", "Hardware", "Processor", "cpu")

_log = logging.getLogger(__name__)
T = TypeVar("T")


def _probe(what: str, fn: Callable[..., T], *args: Any) -> T | None:
    """Run one discovery probe; any failure means "unknown", never an exception."""
    try:
        return fn(*args)
    except Exception:  # discovery must never crash: the field stays unknown
        _log.debug("fingerprint probe %r failed", what, exc_info=True)
        return None


def _positive_int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if value > 0 else None


def _text(value: object) -> str | None:
    """NVML strings are bytes in older pynvml versions and str in newer ones."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        return None
    return value.strip("\x00 \t\n") or None


# --- CPU ------------------------------------------------------------------------------------

def _read_cpuinfo(path: str | os.PathLike) -> list[tuple[str, str]]:
    pairs = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            pairs.append((key.strip(), value.strip()))
    return pairs


def _cpuinfo_model(pairs: Sequence[tuple[str, str]]) -> str | None:
    for wanted in _CPUINFO_MODEL_KEYS:
        for key, value in pairs:
            if key == wanted and value:
                return value
    return None


def _cpuinfo_physical_cores(pairs: Sequence[tuple[str, str]]) -> int | None:
    """Distinct (physical id, core id) pairs; None when the kernel does not report them."""
    cores: set[tuple[str, str]] = set()
    package = "0"
    for key, value in pairs:
        if key == "processor":
            package = "0"
        elif key == "physical id":
            package = value
        elif key == "core id":
            cores.add((package, value))
    return len(cores) or None


def _import_psutil() -> Any:
    import psutil

    return psutil


def _logical_cores(psutil: Any) -> int | None:
    counted = _probe("psutil.cpu_count", lambda: _positive_int(psutil.cpu_count(logical=True)))
    return counted or _probe("os.cpu_count", lambda: _positive_int(os.cpu_count()))


def _memory_bytes(psutil: Any) -> int | None:
    total = _probe("psutil.virtual_memory", lambda: _positive_int(psutil.virtual_memory().total))
    if total is None:
        total = _probe("sysconf memory", lambda: _positive_int(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")))
    return total


# The affinity this process had before asam-tune placed it (main_process_placement, a benchmark,
# a tuning trial). Pinning ourselves to the plan's main cores does not make this another machine
# (the plan's "usable cores" would otherwise read 2 != 1), nor does it shrink the cores a plan
# may divide: discovery sees the affinity from before.
_affinity_before_placement: tuple[int, ...] | None = None


@contextlib.contextmanager
def placed_by_asam_tune(before: Iterable[int] | None) -> Iterator[None]:
    """Inside, this process's affinity is asam-tune's own doing; ``before`` is what it was.

    Nested placements keep the outermost ``before``. None (affinity unknown) changes nothing.
    """
    global _affinity_before_placement
    outermost = _affinity_before_placement is None and before is not None
    if outermost:
        _affinity_before_placement = tuple(sorted({int(core) for core in before})) or None
    try:
        yield
    finally:
        if outermost:
            _affinity_before_placement = None


def remember_affinity_before_pinning(before: Iterable[int] | None) -> None:
    """For a placement that lasts as long as the process (a torchrun rank pinned by AsyncSAM):
    discovery keeps seeing ``before``. A placement already in force keeps its own."""
    global _affinity_before_placement
    if _affinity_before_placement is None and before:
        _affinity_before_placement = tuple(sorted({int(core) for core in before}))


def _affinity(affinity_fn: Callable[[], Iterable[int]] | None) -> tuple[int, ...] | None:
    if affinity_fn is None and _affinity_before_placement is not None:
        return _affinity_before_placement
    if affinity_fn is None:
        getaffinity = getattr(os, "sched_getaffinity", None)  # absent on macOS and Windows
        if getaffinity is None:
            return None
        affinity_fn = lambda: getaffinity(0)  # noqa: E731
    cores = tuple(sorted({int(core) for core in affinity_fn()}))
    return cores or None


def _cgroup_paths(self_cgroup: str | os.PathLike) -> tuple[str | None, str | None]:
    """This process's (cgroup v2 path, cgroup v1 cpu-controller path) from /proc/self/cgroup."""
    v2 = v1 = None
    try:
        text = Path(self_cgroup).read_text(encoding="utf-8")
    except OSError:
        return None, None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _cgroup_dirs(mount: Path, path: str | None) -> list[Path]:
    """The process's cgroup directory under ``mount`` and all its ancestors: limits nest.

    Inside a container the listed path often does not exist under the mount (the mount is
    already the container's cgroup); the mount itself is always included.
    """
    parts = [p for p in (path or "").split("/") if p]
    if ".." in parts:  # a cgroup outside our namespace: only the mount is meaningful
        parts = []
    return [mount.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _read_cpu_max(directory: Path) -> float | None:
    """cgroup v2 ``cpu.max``: "max 100000" (no limit) or "200000 100000" (2 cores)."""
    fields = (directory / "cpu.max").read_text(encoding="utf-8").split()
    if not fields or fields[0] == "max":
        return None
    period = int(fields[1]) if len(fields) > 1 else 100_000
    quota = int(fields[0])
    return quota / period if quota > 0 and period > 0 else None


def _read_cfs_quota(directory: Path) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; a quota of -1 means no limit."""
    quota = int((directory / "cpu.cfs_quota_us").read_text(encoding="utf-8").strip())
    period = int((directory / "cpu.cfs_period_us").read_text(encoding="utf-8").strip())
    return quota / period if quota > 0 and period > 0 else None


def cgroup_quota_cores(cgroup_root: str | os.PathLike = DEFAULT_CGROUP_ROOT,
                       self_cgroup: str | os.PathLike = DEFAULT_SELF_CGROUP) -> float | None:
    """The tightest CPU quota (in cores) over cgroup v2 and v1 and all ancestor cgroups.

    ``None`` when no quota applies or none can be read. os.cpu_count() and psutil ignore it.
    """
    root = Path(cgroup_root)
    v2_path, v1_path = _cgroup_paths(self_cgroup)
    limits: list[float | None] = []
    # Pure v2 mounts the hierarchy at the root; hybrid systems at root/unified.
    for mount in (root, root / "unified"):
        limits += [_probe("cpu.max", _read_cpu_max, d) for d in _cgroup_dirs(mount, v2_path)]
    # v1 mounts the cpu controller alone or together with cpuacct.
    for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        limits += [_probe("cfs quota", _read_cfs_quota, d)
                   for d in _cgroup_dirs(root / name, v1_path)]
    known = [limit for limit in limits if limit is not None]
    return min(known) if known else None


def _usable_count(available: int | None, quota: float | None) -> int | None:
    """floor(min(cores we may run on, quota)), at least 1; None when neither is known."""
    if available is None and quota is None:
        return None
    limit = min(x for x in (available, quota) if x is not None)
    return max(1, math.floor(limit))


def usable_core_ids(*, cgroup_root: str | os.PathLike = DEFAULT_CGROUP_ROOT,
                    self_cgroup: str | os.PathLike = DEFAULT_SELF_CGROUP,
                    affinity_fn: Callable[[], Iterable[int]] | None = None) -> tuple[int, ...]:
    """The cores a plan may divide: the affinity mask, cut to the cgroup quota.

    A quota limits CPU time, not placement, so which cores are kept does not matter; the lowest
    ids are. Without an affinity call (macOS) the ids are 0..n-1 and only their count means much.
    """
    affinity = _probe("affinity", _affinity, affinity_fn)
    if affinity is None:
        affinity = tuple(range(_positive_int(os.cpu_count()) or 1))
    quota = _probe("cgroup quota", cgroup_quota_cores, cgroup_root, self_cgroup)
    return affinity[: _usable_count(len(affinity), quota)]


def usable_cores(*, cgroup_root: str | os.PathLike = DEFAULT_CGROUP_ROOT,
                 self_cgroup: str | os.PathLike = DEFAULT_SELF_CGROUP,
                 affinity_fn: Callable[[], Iterable[int]] | None = None) -> int:
    """How many cores this process may keep busy at once (at least 1)."""
    return len(usable_core_ids(cgroup_root=cgroup_root, self_cgroup=self_cgroup,
                               affinity_fn=affinity_fn))


def _collect_cpu(psutil_module: Any, cpuinfo_path: str | os.PathLike,
                 cgroup_root: str | os.PathLike, self_cgroup: str | os.PathLike,
                 affinity_fn: Callable[[], Iterable[int]] | None) -> CpuInfo:
    psutil = psutil_module if psutil_module is not None else _probe("import psutil", _import_psutil)
    cpuinfo = _probe("cpuinfo", _read_cpuinfo, cpuinfo_path) or []
    # psutil has no CPU model name; /proc/cpuinfo is the source on Linux.
    model = _cpuinfo_model(cpuinfo)
    physical = _probe("psutil physical cores",
                      lambda: _positive_int(psutil.cpu_count(logical=False)))
    if physical is None:
        physical = _cpuinfo_physical_cores(cpuinfo)
    logical = _logical_cores(psutil)
    affinity = _probe("affinity", _affinity, affinity_fn)
    quota = _probe("cgroup quota", cgroup_quota_cores, cgroup_root, self_cgroup)
    available = len(affinity) if affinity is not None else logical
    return CpuInfo(
        model=model,
        physical_cores=physical,
        logical_cores=logical,
        affinity=affinity,
        cgroup_quota_cores=quota,
        usable_cores=_usable_count(available, quota),
        memory_bytes=_memory_bytes(psutil),
    )


# --- GPU ------------------------------------------------------------------------------------

def cores_from_bitmask(words: Iterable[int], word_bits: int = _MASK_WORD_BITS) -> tuple[int, ...]:
    """Core ids of the set bits of an NVML CPU mask: bit j of word i is core i*word_bits+j."""
    cores = []
    for i, word in enumerate(words):
        word = int(word)
        for j in range(word_bits):
            if word >> j & 1:
                cores.append(i * word_bits + j)
    return tuple(cores)


def parse_visible_devices(value: str | None) -> list[int] | list[str] | None:
    """CUDA_VISIBLE_DEVICES as CUDA reads it (the rules of torch.cuda._parse_visible_devices).

    ``None``: unset, every device is visible. Otherwise the ordinals, or the "GPU-"/"MIG-"
    UUID prefixes, up to the first invalid entry; a repeated entry hides every device.
    """
    if value is None:
        return None
    if value.startswith(("GPU-", "MIG-")):
        prefix = value[:4]
        uuids: list[str] = []
        for entry in value.split(","):
            if entry in uuids:
                return []
            if not entry.startswith(prefix):
                break
            uuids.append(entry)
        return uuids
    ordinals: list[int] = []
    for entry in value.split(","):
        ordinal = _leading_integer(entry.strip())
        if ordinal in ordinals:
            return []
        if ordinal < 0:
            break
        ordinals.append(ordinal)
    return ordinals


def _leading_integer(text: str) -> int:
    """Like C's strtoul on an entry: "1gpu" -> 1; no leading digits -> -1."""
    end = 0
    while end < len(text) and (text[end].isdigit() or (end == 0 and text[end] in "+-")):
        end += 1
    try:
        return int(text[:end])
    except ValueError:
        return -1


def uuid_prefixes_to_ordinals(prefixes: Sequence[str], uuids: Sequence[str]) -> list[int]:
    """NVML ordinals of UUID prefixes; stops at an unknown or ambiguous one, empty on repeats."""
    ordinals: list[int] = []
    for prefix in prefixes:
        matches = [i for i, uuid in enumerate(uuids) if uuid.startswith(prefix)]
        if len(matches) != 1:
            break
        if matches[0] in ordinals:
            return []
        ordinals.append(matches[0])
    return ordinals


def _handle_by_index(nvml: Any, index: int) -> Any:
    return _probe("nvmlDeviceGetHandleByIndex", nvml.nvmlDeviceGetHandleByIndex, index)


def _visible_handles(nvml: Any, visible: str | None) -> list[tuple[Any, bool]]:
    """(NVML handle or None, is a MIG instance) per device CUDA will number, in CUDA's order.

    Integer entries are taken as NVML (PCI bus) order, which is CUDA's when
    CUDA_DEVICE_ORDER=PCI_BUS_ID or the GPUs are all of one model.
    """
    count = nvml.nvmlDeviceGetCount()
    selection = parse_visible_devices(visible)
    if selection is None:
        return [(_handle_by_index(nvml, i), False) for i in range(count)]
    if not selection:
        return []
    if isinstance(selection[0], int):
        ordinals = []
        for ordinal in selection:
            if ordinal >= count:  # CUDA stops at the first device that does not exist
                break
            ordinals.append(ordinal)
        return [(_handle_by_index(nvml, i), False) for i in ordinals]
    if selection[0].startswith("MIG-"):
        handles = []
        for uuid in selection:
            handle = _probe("nvmlDeviceGetHandleByUUID", nvml.nvmlDeviceGetHandleByUUID, uuid)
            if handle is None:
                break
            handles.append((handle, True))
        return handles
    uuids = [_probe("uuid", lambda i=i: _text(nvml.nvmlDeviceGetUUID(
        nvml.nvmlDeviceGetHandleByIndex(i)))) or "" for i in range(count)]
    return [(_handle_by_index(nvml, i), False)
            for i in uuid_prefixes_to_ordinals(selection, uuids)]  # type: ignore[arg-type]


def _nearest_cores(nvml: Any, handle: Any) -> tuple[int, ...] | None:
    # The mask must cover every CPU of the machine, not just those this process may use.
    words = max(1, math.ceil((os.cpu_count() or 1) / _MASK_WORD_BITS))
    return cores_from_bitmask(nvml.nvmlDeviceGetCpuAffinity(handle, words)) or None


def _mig_enabled(nvml: Any, handle: Any) -> bool | None:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except Exception as exc:
        not_supported = getattr(nvml, "NVMLError_NotSupported", None)
        if isinstance(not_supported, type) and isinstance(exc, not_supported):
            return False  # GPUs without MIG support answer NotSupported: certainly not MIG
        _log.debug("fingerprint probe 'nvmlDeviceGetMigMode' failed", exc_info=True)
        return None
    return current == getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1)


def _gpu_info(nvml: Any, index: int, handle: Any, mig_instance: bool) -> GpuInfo:
    if handle is None:
        return GpuInfo(index=index, is_mig=True if mig_instance else None)
    return GpuInfo(
        index=index,
        name=_probe("name", lambda: _text(nvml.nvmlDeviceGetName(handle))),
        uuid=_probe("uuid", lambda: _text(nvml.nvmlDeviceGetUUID(handle))),
        memory_bytes=_probe("memory", lambda: _positive_int(
            nvml.nvmlDeviceGetMemoryInfo(handle).total)),
        pcie_generation=_probe("pcie generation", lambda: _positive_int(
            nvml.nvmlDeviceGetCurrPcieLinkGeneration(handle))),
        pcie_width=_probe("pcie width", lambda: _positive_int(
            nvml.nvmlDeviceGetCurrPcieLinkWidth(handle))),
        nearest_cores=_probe("cpu affinity", _nearest_cores, nvml, handle),
        is_mig=True if mig_instance else _mig_enabled(nvml, handle),
    )


def _import_pynvml() -> Any:
    import pynvml  # the nvidia-ml-py package

    return pynvml


def _collect_gpus(nvml: Any) -> tuple[tuple[GpuInfo, ...], str | None]:
    """The GPUs CUDA will show this process, and the driver version; nothing without NVML."""
    if nvml is None:
        nvml = _probe("import pynvml", _import_pynvml)
        if nvml is None:
            return (), None
    try:
        nvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound / _DriverNotLoaded: a machine without GPUs
        _log.debug("nvmlInit failed: no GPUs recorded", exc_info=True)
        return (), None
    try:
        driver = _probe("driver", lambda: _text(nvml.nvmlSystemGetDriverVersion()))
        handles = _probe("visible devices", _visible_handles, nvml,
                         os.environ.get("CUDA_VISIBLE_DEVICES")) or []
        gpus = tuple(_gpu_info(nvml, index, handle, mig)
                     for index, (handle, mig) in enumerate(handles))
        return gpus, driver
    finally:
        _probe("nvmlShutdown", nvml.nvmlShutdown)


# --- software -------------------------------------------------------------------------------

def _torch_version() -> str | None:
    # The distribution's metadata, not torch itself: importing torch takes seconds and
    # schedulers that read fingerprints must not need it.
    try:
        return _text(importlib.metadata.version("torch"))
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_version() -> str | None:
    torch = sys.modules.get("torch")  # only if the caller already paid for importing torch
    if torch is None:
        return None
    return _text(torch.version.cuda)


def collect_fingerprint(*, nvml: Any = None, psutil_module: Any = None,
                        cpuinfo_path: str | os.PathLike = DEFAULT_CPUINFO,
                        cgroup_root: str | os.PathLike = DEFAULT_CGROUP_ROOT,
                        affinity_fn: Callable[[], Iterable[int]] | None = None,
                        self_cgroup: str | os.PathLike = DEFAULT_SELF_CGROUP) -> Fingerprint:
    """Describe this machine and process; unknown fields are ``None``, never an exception.

    ``nvml`` and ``psutil_module`` default to the real ``pynvml`` and ``psutil``; GPUs are
    those CUDA_VISIBLE_DEVICES lets this process see, numbered as CUDA numbers them.
    """
    cpu = _probe("cpu", _collect_cpu, psutil_module, cpuinfo_path, cgroup_root, self_cgroup,
                 affinity_fn) or CpuInfo()
    gpus, driver = _probe("gpus", _collect_gpus, nvml) or ((), None)
    return Fingerprint(
        cpu=cpu,
        gpus=gpus,
        nvidia_driver=driver,
        python_version=_probe("python version", lambda: _text(platform.python_version())),
        torch_version=_probe("torch version", _torch_version),
        cuda_version=_probe("cuda version", _cuda_version),
        platform=_probe("platform", lambda: _text(platform.platform())),
    )
