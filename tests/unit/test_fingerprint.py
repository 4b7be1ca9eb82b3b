"""Hardware discovery with fakes for NVML, psutil, /proc/cpuinfo, cgroups and the affinity call."""
from __future__ import annotations

import ctypes
import importlib.metadata
import os
import subprocess
import sys
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asam_tune import fingerprint as fp
from asam_tune.fingerprint import (
    cgroup_quota_cores,
    collect_fingerprint,
    cores_from_bitmask,
    parse_visible_devices,
    usable_core_ids,
    usable_cores,
    uuid_prefixes_to_ordinals,
)
from asam_tune.errors import RecordError
from asam_tune.records import Fingerprint, dump_record, load_record

pynvml = pytest.importorskip("pynvml")  # the real exception classes, no driver needed

X86_CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz
physical id\t: 0
core id\t\t: 0

processor\t: 1
model name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz
physical id\t: 0
core id\t\t: 0

processor\t: 2
model name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz
physical id\t: 1
core id\t\t: 0
"""

ARM_HARDWARE_CPUINFO = """\
Processor\t: AArch64 Processor rev 4 (aarch64)
processor\t: 0
BogoMIPS\t: 38.40
Features\t: fp asimd evtstrm

Hardware\t: Qualcomm Technologies, Inc SDM845
"""

ARM_PROCESSOR_CPUINFO = """\
processor\t: 0
BogoMIPS\t: 38.40
Processor\t: ARMv7 Processor rev 4 (v7l)
"""


# --- fakes ----------------------------------------------------------------------------------

class FakePsutil:
    """psutil whose answers are set per test; None is a real psutil answer for cpu_count."""

    def __init__(self, logical=None, physical=None, memory=None):
        self.logical, self.physical, self.memory = logical, physical, memory

    def cpu_count(self, logical=True):
        return self.logical if logical else self.physical

    def virtual_memory(self):
        if self.memory is None:
            raise RuntimeError("no memory info")
        return types.SimpleNamespace(total=self.memory)


class BrokenPsutil:
    def __getattr__(self, name):
        raise RuntimeError(f"psutil.{name} exploded")


class FakeNVML:
    """pynvml's surface with the real exception classes; a device value that is an
    exception instance is raised by its query, as NVML does."""

    NVMLError = pynvml.NVMLError
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported
    NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound
    NVMLError_DriverNotLoaded = pynvml.NVMLError_DriverNotLoaded
    NVML_DEVICE_MIG_ENABLE = 1

    def __init__(self, devices=(), *, init_error=None, driver=b"550.54.15", count_error=None,
                 mig_instances=None):
        self.devices = list(devices)
        self.mig_instances = dict(mig_instances or {})
        self.init_error, self.count_error, self.driver = init_error, count_error, driver
        self.calls: list[str] = []
        self.affinity_sizes: list[int] = []

    def _answer(self, handle, key):
        value = handle[key]
        if isinstance(value, BaseException):
            raise value
        return value

    def nvmlInit(self):
        self.calls.append("init")
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self):
        self.calls.append("shutdown")

    def nvmlSystemGetDriverVersion(self):
        return self.driver

    def nvmlDeviceGetCount(self):
        if self.count_error is not None:
            raise self.count_error
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        if not 0 <= index < len(self.devices):
            raise pynvml.NVMLError_InvalidArgument()
        return self.devices[index]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid not in self.mig_instances:
            raise pynvml.NVMLError_NotFound()
        return self.mig_instances[uuid]

    def nvmlDeviceGetName(self, handle):
        return self._answer(handle, "name")

    def nvmlDeviceGetUUID(self, handle):
        return self._answer(handle, "uuid")

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(total=self._answer(handle, "memory"), free=0, used=0)

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle):
        return self._answer(handle, "gen")

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle):
        return self._answer(handle, "width")

    def nvmlDeviceGetCpuAffinity(self, handle, cpu_set_size):
        self.affinity_sizes.append(cpu_set_size)
        words = list(self._answer(handle, "affinity"))[:cpu_set_size]
        words += [0] * (cpu_set_size - len(words))
        return (ctypes.c_ulonglong * cpu_set_size)(*words)  # what pynvml returns

    def nvmlDeviceGetMigMode(self, handle):
        return self._answer(handle, "mig")


def h100(index=0, **overrides):
    device = {"name": "NVIDIA H100 80GB HBM3", "uuid": f"GPU-{index}aaaaaaa-0000-1111",
              "memory": 85_520_809_984, "gen": 5, "width": 16,
              "affinity": [0xFFFF << (16 * index)], "mig": [0, 0]}
    device.update(overrides)
    return device


def mig_slice(uuid):
    not_supported = pynvml.NVMLError_NotSupported()
    return {"name": "NVIDIA A100-SXM4-40GB MIG 1g.5gb", "uuid": uuid, "memory": 5_100_000_000,
            "gen": not_supported, "width": not_supported, "affinity": not_supported,
            "mig": not_supported}


@pytest.fixture
def cpu_env(tmp_path):
    """A cpuinfo file, an empty cgroup tree and a /proc/self/cgroup at the root."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(X86_CPUINFO)
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    self_cgroup = tmp_path / "self_cgroup"
    self_cgroup.write_text("0::/\n")
    return types.SimpleNamespace(cpuinfo=cpuinfo, cgroup=cgroup, self_cgroup=self_cgroup)


def collect(env, **kwargs):
    kwargs.setdefault("nvml", FakeNVML())
    kwargs.setdefault("psutil_module", FakePsutil(logical=8, physical=4, memory=2**34))
    kwargs.setdefault("affinity_fn", lambda: range(8))
    return collect_fingerprint(cpuinfo_path=env.cpuinfo, cgroup_root=env.cgroup,
                               self_cgroup=env.self_cgroup, **kwargs)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# --- CPU ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, model", [
    (X86_CPUINFO, "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz"),
    (ARM_HARDWARE_CPUINFO, "Qualcomm Technologies, Inc SDM845"),
    (ARM_PROCESSOR_CPUINFO, "ARMv7 Processor rev 4 (v7l)"),  # not lowercase "processor: 0"
    ("", None),
])
def test_cpu_model_comes_from_cpuinfo(cpu_env, text, model):
    cpu_env.cpuinfo.write_text(text)
    assert collect(cpu_env).cpu.model == model


def test_psutil_answers_are_used(cpu_env):
    cpu = collect(cpu_env).cpu
    assert (cpu.physical_cores, cpu.logical_cores, cpu.memory_bytes) == (4, 8, 2**34)


def test_psutil_none_falls_back_to_os_and_cpuinfo(cpu_env):
    cpu = collect(cpu_env, psutil_module=FakePsutil(logical=None, physical=None)).cpu
    assert cpu.logical_cores == os.cpu_count()
    assert cpu.physical_cores == 2  # distinct (physical id, core id) pairs in X86_CPUINFO
    assert cpu.memory_bytes == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_psutil_not_installed(cpu_env, monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)  # makes `import psutil` fail
    cpu = collect_fingerprint(nvml=FakeNVML(), cpuinfo_path=cpu_env.cpuinfo,
                              cgroup_root=cpu_env.cgroup, self_cgroup=cpu_env.self_cgroup,
                              affinity_fn=lambda: [0]).cpu
    assert cpu.logical_cores == os.cpu_count()
    assert cpu.physical_cores == 2
    assert cpu.memory_bytes is not None and cpu.memory_bytes > 0


def test_physical_cores_unknown_without_psutil_or_core_ids(cpu_env):
    cpu_env.cpuinfo.write_text(ARM_PROCESSOR_CPUINFO)
    assert collect(cpu_env, psutil_module=FakePsutil()).cpu.physical_cores is None


def test_affinity_and_usable_cores(cpu_env):
    cpu = collect(cpu_env, affinity_fn=lambda: {5, 1, 3}).cpu
    assert cpu.affinity == (1, 3, 5)
    assert cpu.usable_cores == 3
    assert cpu.cgroup_quota_cores is None


def test_no_sched_getaffinity_uses_logical_cores(cpu_env, monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # as on macOS
    write(cpu_env.cgroup / "cpu.max", "300000 100000\n")
    cpu = collect(cpu_env, affinity_fn=None).cpu
    assert cpu.affinity is None
    assert cpu.usable_cores == 3  # min(8 logical, quota 3)
    ids = usable_core_ids(cgroup_root=cpu_env.cgroup, self_cgroup=cpu_env.self_cgroup)
    assert ids == tuple(range(min(os.cpu_count(), 3)))


@pytest.mark.parametrize("cpu_max, quota, usable", [
    ("max 100000\n", None, 8),
    ("200000 100000\n", 2.0, 2),
    ("150000 100000\n", 1.5, 1),   # floor: a plan cannot divide half a core
    ("50000 100000\n", 0.5, 1),    # but never below one
    ("1600000 100000\n", 16.0, 8), # the affinity mask is the tighter limit
    ("garbage\n", None, 8),
    ("", None, 8),
])
def test_cgroup_v2_cpu_max(cpu_env, cpu_max, quota, usable):
    write(cpu_env.cgroup / "cpu.max", cpu_max)
    cpu = collect(cpu_env).cpu
    assert cpu.cgroup_quota_cores == quota
    assert cpu.usable_cores == usable


@pytest.mark.parametrize("quota_us, period_us, quota", [
    ("-1", "100000", None),
    ("250000", "100000", 2.5),
    ("100000", "50000", 2.0),
])
def test_cgroup_v1_cfs_quota(cpu_env, quota_us, period_us, quota):
    cpu_env.self_cgroup.write_text("4:cpu,cpuacct:/\n0::/\n")
    write(cpu_env.cgroup / "cpu,cpuacct" / "cpu.cfs_quota_us", quota_us + "\n")
    write(cpu_env.cgroup / "cpu,cpuacct" / "cpu.cfs_period_us", period_us + "\n")
    assert cgroup_quota_cores(cpu_env.cgroup, cpu_env.self_cgroup) == quota


def test_nested_cgroup_limits_take_the_tightest_ancestor(cpu_env):
    cpu_env.self_cgroup.write_text("0::/kubepods/pod1/ctr\n")
    write(cpu_env.cgroup / "kubepods" / "pod1" / "ctr" / "cpu.max", "max 100000\n")
    write(cpu_env.cgroup / "kubepods" / "pod1" / "cpu.max", "300000 100000\n")
    write(cpu_env.cgroup / "kubepods" / "cpu.max", "600000 100000\n")
    assert cgroup_quota_cores(cpu_env.cgroup, cpu_env.self_cgroup) == 3.0


def test_container_cgroup_path_missing_under_the_mount_uses_the_mount(cpu_env):
    # Without a cgroup namespace the listed path is the host's; the mount is ours.
    cpu_env.self_cgroup.write_text("3:cpu:/docker/abc123\n")
    write(cpu_env.cgroup / "cpu" / "cpu.cfs_quota_us", "200000")
    write(cpu_env.cgroup / "cpu" / "cpu.cfs_period_us", "100000")
    assert cgroup_quota_cores(cpu_env.cgroup, cpu_env.self_cgroup) == 2.0


def test_usable_core_ids_cut_affinity_by_quota(cpu_env):
    write(cpu_env.cgroup / "cpu.max", "250000 100000")
    kwargs = dict(cgroup_root=cpu_env.cgroup, self_cgroup=cpu_env.self_cgroup,
                  affinity_fn=lambda: [6, 0, 4, 2])
    assert usable_core_ids(**kwargs) == (0, 2)
    assert usable_cores(**kwargs) == 2


def test_cpu_probes_never_crash(tmp_path):
    def affinity_fails():
        raise OSError("sched_getaffinity failed")

    result = collect_fingerprint(nvml=FakeNVML(), psutil_module=BrokenPsutil(),
                                 cpuinfo_path=tmp_path / "missing",
                                 cgroup_root=tmp_path / "missing-cgroup",
                                 self_cgroup=tmp_path / "missing-self", affinity_fn=affinity_fails)
    cpu = result.cpu
    assert (cpu.model, cpu.affinity, cpu.cgroup_quota_cores) == (None, None, None)
    assert cpu.logical_cores == os.cpu_count()
    assert cpu.usable_cores == os.cpu_count()


# --- GPU ------------------------------------------------------------------------------------

def test_pynvml_not_installed(cpu_env, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    result = collect(cpu_env, nvml=None)
    assert (result.gpus, result.nvidia_driver) == ((), None)


@pytest.mark.parametrize("error", [pynvml.NVMLError_LibraryNotFound(),
                                   pynvml.NVMLError_DriverNotLoaded(),
                                   RuntimeError("unexpected")])
def test_no_driver_means_no_gpus(cpu_env, error):
    nvml = FakeNVML([h100()], init_error=error)
    result = collect(cpu_env, nvml=nvml)
    assert (result.gpus, result.nvidia_driver) == ((), None)
    assert nvml.calls == ["init"]  # no shutdown of a library that never started


def test_two_gpus_all_fields(cpu_env, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nvml = FakeNVML([h100(0), h100(1, name=b"NVIDIA H100 80GB HBM3", uuid=b"GPU-1bbb",
                              mig=[1, 1])])
    result = collect(cpu_env, nvml=nvml)
    first, second = result.gpus
    assert first.model_dump() == {
        "index": 0, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-0aaaaaaa-0000-1111",
        "memory_bytes": 85_520_809_984, "pcie_generation": 5, "pcie_width": 16,
        "nearest_cores": tuple(range(16)), "is_mig": False}
    # bytes from older pynvml versions become str
    assert (second.index, second.name, second.uuid) == (1, "NVIDIA H100 80GB HBM3", "GPU-1bbb")
    assert second.nearest_cores == tuple(range(16, 32))
    assert second.is_mig is True
    assert result.nvidia_driver == "550.54.15"
    assert nvml.calls == ["init", "shutdown"]
    expected_words = -(-os.cpu_count() // 64)
    assert nvml.affinity_sizes == [expected_words, expected_words]


def test_not_supported_queries_leave_fields_unknown(cpu_env, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    not_supported = pynvml.NVMLError_NotSupported()
    device = h100(gen=not_supported, width=not_supported, affinity=not_supported,
                  memory=pynvml.NVMLError_Unknown(), name=RuntimeError("odd"),
                  mig=not_supported)
    (gpu,) = collect(cpu_env, nvml=FakeNVML([device])).gpus
    assert (gpu.name, gpu.memory_bytes, gpu.pcie_generation, gpu.pcie_width,
            gpu.nearest_cores) == (None, None, None, None, None)
    assert gpu.uuid == "GPU-0aaaaaaa-0000-1111"
    assert gpu.is_mig is False  # GPUs without MIG answer NotSupported to nvmlDeviceGetMigMode


def test_mig_mode_other_errors_are_unknown(cpu_env, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    (gpu,) = collect(cpu_env, nvml=FakeNVML([h100(mig=pynvml.NVMLError_Unknown())])).gpus
    assert gpu.is_mig is None


def test_mig_slices_from_cuda_visible_devices(cpu_env, monkeypatch):
    uuids = ["MIG-11111111-aaaa", "MIG-22222222-bbbb"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(uuids + ["MIG-unknown"]))
    nvml = FakeNVML([h100(mig=[1, 1])], mig_instances={u: mig_slice(u) for u in uuids})
    gpus = collect(cpu_env, nvml=nvml).gpus
    assert [(g.index, g.uuid, g.is_mig) for g in gpus] == [(0, uuids[0], True),
                                                             (1, uuids[1], True)]
    assert gpus[0].memory_bytes == 5_100_000_000
    assert (gpus[0].pcie_generation, gpus[0].nearest_cores) == (None, None)


def test_zero_nearest_cores_mask_is_unknown(cpu_env, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    (gpu,) = collect(cpu_env, nvml=FakeNVML([h100(affinity=[0])])).gpus
    assert gpu.nearest_cores is None


def test_shutdown_even_when_enumeration_fails(cpu_env):
    nvml = FakeNVML([h100()], count_error=RuntimeError("boom"))
    result = collect(cpu_env, nvml=nvml)
    assert result.gpus == ()
    assert nvml.calls == ["init", "shutdown"]


def test_failed_handle_keeps_the_device_with_unknown_fields(cpu_env, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nvml = FakeNVML([h100(0), h100(1)])
    real = nvml.nvmlDeviceGetHandleByIndex

    def flaky(index):
        if index == 0:
            raise pynvml.NVMLError_GpuIsLost()
        return real(index)

    nvml.nvmlDeviceGetHandleByIndex = flaky
    first, second = collect(cpu_env, nvml=nvml).gpus
    assert (first.index, first.name, first.is_mig) == (0, None, None)
    assert second.uuid == "GPU-1aaaaaaa-0000-1111"


@pytest.mark.parametrize("visible, expected_uuids", [
    ("1", ["GPU-1"]),
    ("1,0", ["GPU-1", "GPU-0"]),
    ("0,7,1", ["GPU-0"]),          # CUDA stops at the first device that does not exist
    ("", []),
    ("-1", []),
    ("0,0", []),                   # a repeat hides every device
    ("GPU-2", ["GPU-2"]),
    ("GPU-2,GPU-0", ["GPU-2", "GPU-0"]),
    ("GPU-", []),                  # ambiguous prefix stops the list
    ("GPU-1,GPU-9", ["GPU-1"]),
])
def test_cuda_visible_devices_selects_and_orders_gpus(cpu_env, monkeypatch, visible,
                                                      expected_uuids):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    nvml = FakeNVML([h100(i, uuid=f"GPU-{i}") for i in range(3)])
    gpus = collect(cpu_env, nvml=nvml).gpus
    assert [g.uuid for g in gpus] == expected_uuids
    assert [g.index for g in gpus] == list(range(len(expected_uuids)))  # CUDA's numbering


# --- CUDA_VISIBLE_DEVICES rules against torch's own parser ----------------------------------

visible_entries = st.lists(
    st.one_of(st.integers(-2, 12).map(str), st.sampled_from(["GPU-a", "GPU-ab", "GPU-b", "MIG-x",
                                                              "1gpu", " 3", "x", ""])),
    max_size=5).map(",".join)


@pytest.fixture(scope="module")
def torch_cuda():
    """torch.cuda holds the reference rules for CUDA_VISIBLE_DEVICES."""
    return pytest.importorskip("torch.cuda")


@settings(deadline=None)
@given(visible=visible_entries)
def test_parse_visible_devices_matches_torch(torch_cuda, visible):
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible
    try:
        expected = torch_cuda._parse_visible_devices()
    finally:
        if saved is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    assert parse_visible_devices(visible) == expected


@settings(deadline=None)
@given(prefixes=st.lists(st.sampled_from(["GPU-", "GPU-a", "GPU-ab", "GPU-b", "GPU-c", "GPU-abc"]),
                         max_size=4),
       uuids=st.lists(st.sampled_from(["GPU-abc", "GPU-abd", "GPU-b12", "GPU-c"]), max_size=4,
                      unique=True))
def test_uuid_prefixes_match_torch(torch_cuda, prefixes, uuids):
    assert uuid_prefixes_to_ordinals(prefixes, uuids) == \
        torch_cuda._transform_uuid_to_ordinals(prefixes, uuids)


def test_parse_visible_devices_unset():
    assert parse_visible_devices(None) is None


# --- CPU masks ------------------------------------------------------------------------------

def test_cores_from_bitmask_examples():
    assert cores_from_bitmask([0b1011]) == (0, 1, 3)
    assert cores_from_bitmask([1 << 63, 1]) == (63, 64)
    assert cores_from_bitmask((ctypes.c_ulonglong * 2)(0, 0b110)) == (65, 66)
    assert cores_from_bitmask([]) == ()


@given(st.lists(st.integers(0, 2**64 - 1), max_size=4))
def test_cores_from_bitmask_matches_one_big_integer(words):
    big = sum(word << (64 * i) for i, word in enumerate(words))
    reference = tuple(bit for bit in range(64 * len(words)) if big >> bit & 1)
    assert cores_from_bitmask(words) == reference


# --- software versions ----------------------------------------------------------------------

def test_torch_version_from_metadata(cpu_env, monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "9.9.9" if name == "torch" else "0")
    assert collect(cpu_env).torch_version == "9.9.9"

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert collect(cpu_env).torch_version is None


def test_cuda_version_only_from_an_imported_torch(cpu_env, monkeypatch):
    fake_torch = types.SimpleNamespace(version=types.SimpleNamespace(cuda="12.4"))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    assert collect(cpu_env).cuda_version == "12.4"
    fake_torch.version.cuda = None  # a CPU build
    assert collect(cpu_env).cuda_version is None
    monkeypatch.delitem(sys.modules, "torch")
    assert collect(cpu_env).cuda_version is None


def test_software_fields(cpu_env):
    result = collect(cpu_env)
    assert result.python_version == ".".join(map(str, sys.version_info[:3]))
    assert result.platform


# --- the real machine -----------------------------------------------------------------------

def test_real_machine_fingerprint_validates():
    result = collect_fingerprint()
    assert Fingerprint.model_validate_json(result.to_json()) == result
    assert usable_cores() >= 1
    assert result.cpu.usable_cores == usable_cores()
    if hasattr(os, "sched_getaffinity"):
        assert set(usable_core_ids()) <= os.sched_getaffinity(0)


def test_real_machine_fingerprint_survives_the_file_round_trip(tmp_path):
    result = collect_fingerprint()
    dump_record(result, tmp_path / "fingerprint.json")
    assert load_record(Fingerprint, tmp_path / "fingerprint.json") == result


@pytest.mark.process
@pytest.mark.timeout(60)
def test_collecting_does_not_import_torch():
    code = ("import sys, asam_tune.fingerprint as f; fp = f.collect_fingerprint(); "
            "assert fp.torch_version is not None; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=50, check=True)
    assert out.stdout.strip() == "False"


def test_module_exports():
    assert set(fp.__all__) <= set(dir(fp))
