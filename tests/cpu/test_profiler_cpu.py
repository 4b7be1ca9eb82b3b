"""The profiler on the real CPU: the torch device, probe processes, and a profile end to end.

No timing thresholds: these tests check what was measured and how, never how fast.
"""
from __future__ import annotations

import os
import time

import pytest
import torch
from torch import nn

from asam_tune.devices import DeviceBroken, OutOfMemory
from asam_tune.devices.torch_device import TorchComputeDevice, is_fatal_device_error, is_out_of_memory
from asam_tune.errors import UserInputError, WorkloadError
from asam_tune.fingerprint import usable_core_ids
from asam_tune.costmodel import make_plan
from asam_tune.profiler import run_profile
from asam_tune.profiler.machine_load import end_warning, read_load_average, start_warning
from asam_tune.profiler.probe_process import ProbeProcess, probe_environment
from asam_tune.profiler.run import _handovers, _Layout, _Progress, _sweep_in_probe
from asam_tune.profiler.sweep import sweep
from asam_tune.records import Profile, dump_record, load_record
from asam_tune.records.profile import DeviceConfig
from asam_tune import affinity
from asam_tune.timing import MeasureSettings, PerfClock
from asam_tune.workloads import Workload, load_workload, model_state_fingerprint

TINY = MeasureSettings(warmup=1, min_time_s=0.01, min_repeats=2, max_repeats=5, noise_threshold=0.1)
TINY_REQUEST = {"settings": {"warmup": 1, "min_time_s": 0.01, "min_repeats": 2, "max_repeats": 5,
                             "noise_threshold": 0.1}}
CPU = DeviceConfig(device="cpu")
HERE = "tests.cpu.test_profiler_cpu"


# --- models that misbehave at a batch size (module level: probe processes import them) -----------


class FailsAbove(nn.Module):
    """A linear model whose forward raises ``error`` once the batch exceeds ``limit``."""

    def __init__(self, limit: int, error: BaseException | None = None, action=None):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.limit = limit
        self.error = error
        self.action = action

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            if self.action is not None:
                self.action()
            raise self.error
        return self.linear(x)


def crashing_model() -> nn.Module:
    """Dies like a segfaulting kernel at batch > 8."""
    return FailsAbove(8, action=lambda: os._exit(70))


def hanging_model() -> nn.Module:
    return FailsAbove(8, action=lambda: time.sleep(3600))


def _workload(model_factory) -> Workload:
    return Workload("failing", (4,), 3, model_factory)


# --- the torch device, in process --------------------------------------------------------------------


def test_profiling_leaves_the_users_model_untouched():
    workload = load_workload("mnist1d-cnn")
    model = workload.build()
    model.eval()  # the copy trains; the user's mode must survive too
    before = model_state_fingerprint(model)
    device = TorchComputeDevice(workload, CPU, model=model)
    points = sweep(device, (2, 4), TINY, PerfClock())
    assert [p.status for p in points] == ["ok", "ok"]
    assert model_state_fingerprint(model) == before
    assert not model.training
    # The copy really trained: its BatchNorm counted every forward.
    copy_bn = next(m for m in device._model.modules() if isinstance(m, nn.BatchNorm1d))
    assert copy_bn.num_batches_tracked.item() > 0
    device.close()


def test_out_of_memory_messages_are_recognised():
    try:
        torch.empty(2 ** 60, dtype=torch.uint8)  # the real CPU allocator's message
    except RuntimeError as exc:
        assert is_out_of_memory(exc)
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert is_fatal_device_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_fatal_device_error(RuntimeError("CUDA out of memory"))


def test_out_of_memory_in_forward_is_an_oom_point_and_smaller_sizes_are_kept():
    oom = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
    device = TorchComputeDevice(_workload(lambda: FailsAbove(16, oom)), CPU)
    points = sweep(device, (8, 16, 32, 64), TINY, PerfClock())
    assert [p.status for p in points] == ["ok", "ok", "oom", "oom"]
    assert "DefaultCPUAllocator" in points[2].error
    assert device._batch is None  # freed
    # The device is still usable after an out-of-memory: a smaller size runs again.
    assert sweep(device, (8,), TINY, PerfClock())[0].status == "ok"


def test_illegal_memory_access_breaks_the_device_for_good():
    fatal = RuntimeError("CUDA error: an illegal memory access was encountered")
    device = TorchComputeDevice(_workload(lambda: FailsAbove(8, fatal)), CPU)
    points = sweep(device, (8, 16, 32), TINY, PerfClock())
    assert [p.status for p in points] == ["ok", "error"]
    assert "illegal memory access" in points[1].error
    with pytest.raises(DeviceBroken):
        device.prepare(8)  # never retried in this process


def test_other_errors_propagate_unchanged():
    device = TorchComputeDevice(_workload(lambda: FailsAbove(8, ValueError("bad shape 17"))), CPU)
    device.prepare(16)
    with pytest.raises(ValueError, match="bad shape 17"):
        device.forward_backward()
    # A Python MemoryError is an out-of-memory too, and comes out as the sweep's OutOfMemory.
    device = TorchComputeDevice(_workload(lambda: FailsAbove(1, MemoryError())), CPU)
    device.prepare(2)
    with pytest.raises(OutOfMemory):
        device.forward_backward()


# --- probe processes ---------------------------------------------------------------------------------


def test_probes_follow_the_workers_environment_rules(monkeypatch):
    # One list for probes and workers: every torchrun variable the worker strips, every thread
    # variable the worker sets (OpenBLAS included).
    for key in (*affinity.LAUNCHER_VARIABLES, "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.setenv(key, "1")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "16")
    env = probe_environment(DeviceConfig(device="cpu", threads=3))
    assert affinity.launcher_variables(env) == []
    assert "OPENBLAS_NUM_THREADS" in affinity.THREAD_VARIABLES
    assert {k: env[k] for k in affinity.THREAD_VARIABLES} == dict.fromkeys(affinity.THREAD_VARIABLES, "3")


@pytest.mark.process
@pytest.mark.timeout(60)
@pytest.mark.parametrize("threads", [1, 2])
def test_probe_runs_with_the_requested_threads_and_affinity(threads):
    cores = usable_core_ids()
    if len(cores) < threads:
        pytest.skip(f"needs {threads} usable cores, has {len(cores)}")
    # The last cores, not the first: the default affinity would not pass for the requested one.
    chosen = cores[-threads:]
    config = DeviceConfig(device="cpu", threads=threads, cores=chosen)
    request = {**TINY_REQUEST, "workload": {"spec": "mnist1d-cnn"}, "batch_sizes": [2]}
    with ProbeProcess("sweep", config, request) as probe:
        assert probe.started["threads"] == threads
        assert probe.started["affinity"] == list(chosen)
        assert probe.started["pid"] != os.getpid()
        point = probe.wait_for("point", 60)["point"]
        assert point["status"] == "ok"
        probe.wait_for("done", 60)


@pytest.mark.process
@pytest.mark.timeout(60)
@pytest.mark.parametrize("factory, expected", [
    ("crashing_model", "exited with code 70"),
    ("hanging_model", "gave no answer within 5 s"),
])
def test_a_probe_that_crashes_or_hangs_becomes_an_error_point(factory, expected):
    request = {**TINY_REQUEST, "workload": {"spec": f"{HERE}:{factory}", "input_shape": [4], "num_classes": 3}}
    config = DeviceConfig(device="cpu", threads=1, cores=usable_core_ids()[:1])
    messages = []
    # 5 s per point, all of which the hanging probe costs: the good points (a 4-to-3 linear model
    # timed a few times, the first after importing this module) answer well within it even on a
    # machine busy with other jobs.
    points, probe = _sweep_in_probe(config, request, (4, 8, 16, 32), 5.0, _Progress(messages.append, 4),
                                    serve=False)
    assert probe is None
    assert [(p.batch_size, p.status) for p in points] == [(4, "ok"), (8, "ok"), (16, "error")]
    assert expected in points[-1].error
    assert any(expected in str(m) for m in messages)


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.timeout(60)
def test_contention_with_a_crashing_busy_probe_is_reported_and_left_out():
    import json

    from asam_tune.profiler.contention import BusyCandidate, measure_contention

    cores = usable_core_ids()
    main = DeviceConfig(device="cpu", threads=1, cores=cores[:1])
    request = {**TINY_REQUEST, "workload": {"spec": "mnist1d-cnn"}, "batch_sizes": [2], "serve": True}
    crashing = {**TINY_REQUEST, "workload": {"spec": f"{HERE}:crashing_model", "input_shape": [4], "num_classes": 3}}
    busy = DeviceConfig(device="cpu", threads=1, cores=cores[-1:])
    reports = []
    with ProbeProcess("sweep", main, request) as probe:
        probe.wait_for("point", 60)
        probe.wait_for("done", 60)
        probe.send(json.dumps({"cmd": "prepare", "batch_size": 2}))
        probe.wait_for("ready", 60)
        points = measure_contention(probe, main, 2, [BusyCandidate(busy, 16), BusyCandidate(busy, 4)], crashing,
                                    timeout_s=30, report=reports.append)
    # Batch 16 kills the busy probe in its warm-up; batch 4 runs and is measured.
    assert [(p.busy, p.batch_size) for p in points] == [("cpu/1t", 2)]
    assert points[0].main_alone.median_s > 0 and points[0].main_while_busy.median_s > 0
    assert len(reports) == 1 and "exited with code 70" in reports[0]


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.timeout(120)
def test_the_main_probe_times_handovers_and_survives_a_worker_that_cannot_start():
    cores = usable_core_ids()
    main = DeviceConfig(device="cpu", threads=1, cores=cores[:1])
    worker = DeviceConfig(device="cpu", threads=1, cores=cores[-1:])
    # A core this machine does not have: the perturber refuses to start its worker.
    impossible = DeviceConfig(device="cpu", threads=1, cores=(os.cpu_count() + 7,))
    request = {**TINY_REQUEST, "workload": {"spec": "mnist1d-cnn"}, "batch_sizes": [2], "serve": True}
    messages = []
    tracker = _Progress(messages.append, 2)
    with ProbeProcess("sweep", main, request) as probe:
        probe.wait_for("point", 60)
        probe.wait_for("done", 60)
        points = _handovers(_Layout(main, (main,), (impossible, worker)), probe, 60, tracker)
        # The probe is still serving after the failed start.
        probe.send('{"cmd": "quit"}')
    [point] = points
    assert (point.main, point.perturbation, point.weights_on) == ("cpu/1t", "cpu/1t", "cpu")
    # TINY: at least 2 samples after the warm-up, each submit + collect + foreach calls.
    assert len(point.per_step.samples_s) >= 2 and point.per_step.median_s > 0
    assert any(f"handover to {impossible.key} not measured" in str(m) and "Invalid cores" in str(m)
               for m in messages)
    assert tracker.done == tracker.total


# --- end to end ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.timeout(120)
def test_a_quick_cpu_profile_end_to_end(tmp_path, monkeypatch):
    updates = []
    loads = []
    started = []  # (mode, configuration, autocast) of every probe
    real_init = ProbeProcess.__init__

    def recording_init(self, mode, config, request, *args, **kwargs):
        started.append((mode, config.key, request.get("autocast")))
        real_init(self, mode, config, request, *args, **kwargs)

    monkeypatch.setattr(ProbeProcess, "__init__", recording_init)

    def real_load_average():  # the real figures, seen on their way in
        loads.append(read_load_average())
        return loads[-1]

    # With an ascent dtype: the candidates are swept once more under autocast (the CLI's and the
    # README's runs cover a profile without one).
    profile = run_profile("mnist1d-cnn", quick=True, batch_sizes=[4, 8], progress=updates.append,
                          load_average=real_load_average, ascent_dtype="bf16")
    cores = usable_core_ids()
    keys = [d.config.key for d in profile.devices]
    assert keys[0] == f"cpu/{max(1, len(cores) // 2)}t"  # the main device comes first
    assert f"cpu/{len(cores)}t" in keys
    for entry in profile.devices:
        assert [p.batch_size for p in entry.points] == [4, 8]
        assert all(p.status == "ok" for p in entry.points)
        assert all(len(p.forward_backward.samples_s) >= 3 for p in entry.points)
    assert profile.settings.quick and profile.settings.min_repeats == 3
    assert profile.workload.name == "mnist1d-cnn" and profile.workload.parameter_count > 0
    assert profile.transfers and all(t.source == keys[0] for t in profile.transfers)
    assert profile.transfers[0].parameter_bytes == 4 * profile.workload.parameter_count
    if len(cores) >= 2:
        [contention] = profile.contention
        assert contention.main == keys[0] and contention.batch_size == 8
        # CPU only: the main probe on the first half of the cores, the busy one on the rest.
        assert contention.main_cores == profile.devices[0].config.cores == cores[:len(cores) // 2]
        assert contention.busy_cores == cores[len(cores) // 2:][:len(contention.busy_cores)]
    # The load averages at the start and at the end, as read, and what the warnings said of them.
    load = profile.machine_load
    assert len(loads) == 2 and (load.start, load.end) == tuple(loads)
    assert load.usable_cores == len(cores) == profile.fingerprint.cpu.usable_cores
    if hasattr(os, "getloadavg"):
        assert len(load.start) == len(load.end) == 3
    assert load.elapsed_s > 0 and load.profiler_busy_cores > 0  # the probes' CPU time is counted
    warnings = [u.message for u in updates if u.warning]
    # Busy points (this machine is shared) are warned about as they happen, and flagged if busy twice.
    busy = [w for w in warnings if w.startswith("cpu/") or w.startswith("another asam-tune job")]
    assert [w for w in warnings if w not in busy] == \
        [w for w in (start_warning(load.start, load.usable_cores), end_warning(load)) if w]
    for key, point in profile.busy_points():
        assert any(w.startswith(f"{key}: batch ") and "busy again" in w for w in busy), (key, point.batch_size)
    # One handover per CPU worker placement beside the main device, all from the main device.
    assert profile.schema_version == 2 and profile.handovers
    assert all(h.main == keys[0] and h.perturbation.startswith("cpu/") for h in profile.handovers)
    assert updates[-1].done == updates[-1].total
    # On this CPU-only machine every configuration is a candidate: each is timed again under autocast.
    assert profile.ascent_dtype == "bfloat16"
    for entry in profile.devices:
        assert [p.batch_size for p in entry.ascent_points] == [4, 8]
        assert all(p.status == "ok" for p in entry.ascent_points)
    # The ascent sweeps and the busy candidates ran under autocast; the main sweep did not.
    sweeps = [(key, autocast) for mode, key, autocast in started if mode == "sweep"]
    assert sweeps[0] == (keys[0], None)
    assert {key for key, autocast in sweeps if autocast == "bfloat16"} == set(keys)
    busy_probes = [autocast for mode, _, autocast in started if mode == "busy"]
    assert busy_probes and all(autocast == "bfloat16" for autocast in busy_probes)
    plan = make_plan(profile, 8, asynchronous=True, min_perturbation_fraction=None)
    assert plan.ascent_dtype == "bfloat16" and any("under autocast to bfloat16" in n for n in plan.notes)
    # Validates and round-trips through the file format.
    path = tmp_path / "profile.json"
    dump_record(profile, path)
    assert load_record(Profile, path) == profile


def test_user_mistakes_are_refused_before_anything_runs():
    with pytest.raises(UserInputError, match="'tpu'"):
        run_profile("mnist1d-cnn", devices=["tpu"])
    with pytest.raises(WorkloadError):
        run_profile("no-such-model")
    with pytest.raises(UserInputError, match="-8"):
        run_profile("mnist1d-cnn", batch_sizes=[-8])
    with pytest.raises(UserInputError, match="unknown ascent dtype 'int8'"):
        run_profile("mnist1d-cnn", ascent_dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="'cuda:0' is not available"):
            run_profile("mnist1d-cnn", devices=["cpu", "cuda:0"])


# A parent whose probe is stuck in a forward pass (not reading its input, so only the kernel's
# parent-death signal can stop it).
_ORPHAN_PARENT = """
import time
from asam_tune.profiler.probe_process import ProbeProcess
from asam_tune.records.profile import DeviceConfig
request = {"settings": {"warmup": 1, "min_time_s": 0.01, "min_repeats": 2, "max_repeats": 5,
                        "noise_threshold": 0.1},
           "workload": {"spec": "tests.cpu.test_profiler_cpu:hanging_model", "input_shape": [4],
                        "num_classes": 3},
           "batch_sizes": [4, 16]}
probe = ProbeProcess("sweep", DeviceConfig(device="cpu", threads=1), request)
probe.wait_for("point", 60)
print(probe.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.process
@pytest.mark.timeout(60)
def test_a_probe_dies_with_its_parent():
    import signal
    import subprocess
    import sys

    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN_PARENT], stdout=subprocess.PIPE, text=True)
    probe_pid = None
    try:
        probe_pid = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)  # no cleanup code runs in the parent
        parent.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(probe_pid):
            time.sleep(0.05)
        assert not _alive(probe_pid), f"probe {probe_pid} outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        if probe_pid is not None and _alive(probe_pid):
            os.kill(probe_pid, signal.SIGKILL)  # leave no orphan behind, even on failure


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.process
@pytest.mark.timeout(300)
def test_a_quick_gpu_profile_measures_the_gpu_first_with_pinned_transfers_and_contention():
    profile = run_profile("resnet20", devices=["cpu", "cuda:0"], cpu_threads=[1], quick=True,
                          batch_sizes=[8, 32])
    assert [d.config.key for d in profile.devices] == ["cuda:0", "cpu/1t"]
    assert all(p.status == "ok" for d in profile.devices for p in d.points)
    [transfer] = profile.transfers
    assert (transfer.source, transfer.target, transfer.pinned) == ("cuda:0", "cpu/1t", True)
    [contention] = profile.contention
    assert (contention.main, contention.busy, contention.batch_size) == ("cuda:0", "cpu/1t", 32)
    [handover] = profile.handovers  # timed by the GPU's probe from its weights: the copy-stream path
    assert (handover.main, handover.perturbation, handover.weights_on) == ("cuda:0", "cpu/1t", "cuda:0")


@pytest.mark.gpu
def test_cuda_device_synchronises_and_leaves_the_model_untouched():
    workload = load_workload("mnist1d-cnn")
    model = workload.build()
    before = model_state_fingerprint(model)
    device = TorchComputeDevice(workload, DeviceConfig(device="cuda:0"), model=model)
    points = sweep(device, (2, 4), TINY, PerfClock())
    assert [p.status for p in points] == ["ok", "ok"]
    assert next(device._model.parameters()).is_cuda
    assert model_state_fingerprint(model) == before
    device.close()
