"""The batch-size sweep on a fake device (time = a + b * batch): exact numbers, oom, errors.

Also the profiler's layout (which configurations are swept, which is main, what runs beside
it), which needs no device at all.
"""
from __future__ import annotations

import pytest

from asam_tune.devices import DeviceBroken, FakeDevice, OutOfMemory
from asam_tune.errors import UserInputError
from asam_tune.profiler.contention import representative_batch
from asam_tune.profiler.run import default_thread_counts, parse_devices, plan_layout
from asam_tune.profiler.sweep import check_batch_sizes, geometric_batch_sizes, sweep
from asam_tune.records.profile import DeviceConfig, DeviceProfile
from asam_tune.timing import FakeClock, MeasureSettings

# Powers of two: every fake duration and clock difference is exact in binary.
A, B, OPT = 0.25, 2.0 ** -7, 0.0625
SETTINGS = MeasureSettings(warmup=1, min_time_s=1.0, min_repeats=3, max_repeats=20, noise_threshold=0.1)
SIZES = (8, 16, 32, 64, 128, 256, 512)


def make_device(**kwargs) -> FakeDevice:
    return FakeDevice(A, B, OPT, clock=FakeClock(), **kwargs)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_forward_backward_median_is_a_plus_b_batch_and_the_step_is_separate(asynchronous):
    device = make_device(asynchronous=asynchronous)
    points = sweep(device, SIZES, SETTINGS, device.clock)
    assert [p.batch_size for p in points] == list(SIZES)
    for p in points:
        assert p.status == "ok"
        assert p.forward_backward.median_s == A + B * p.batch_size
        assert set(p.forward_backward.samples_s) == {A + B * p.batch_size}
        assert p.forward_backward.iqr_s == 0.0 and not p.forward_backward.noisy
        assert p.optimizer_step.median_s == OPT
        # 1.0 s of samples at 0.0625 s each: the step has its own repeat count.
        assert len(p.optimizer_step.samples_s) == 16


def test_sizes_are_swept_smallest_first_without_duplicates():
    device = make_device()
    points = sweep(device, [64, 8, 64, 16], SETTINGS, device.clock)
    assert [p.batch_size for p in points] == [8, 16, 64]
    assert device.prepared == [8, 16, 64]
    assert device.released == 3


def test_out_of_memory_marks_that_size_and_every_larger_one_without_trying_them():
    device = make_device(oom_above=128)
    points = sweep(device, SIZES, SETTINGS, device.clock)
    status = {p.batch_size: p.status for p in points}
    assert status == {8: "ok", 16: "ok", 32: "ok", 64: "ok", 128: "ok", 256: "oom", 512: "oom"}
    assert device.prepared == [8, 16, 32, 64, 128, 256]  # 512 never tried
    assert "limit 128" in points[5].error
    assert points[6].error == "not tried: out of memory at batch 256"
    assert points[4].forward_backward.median_s == A + B * 128
    assert device.released == 6  # memory freed after the oom too


def test_out_of_memory_at_the_smallest_size_leaves_no_ok_point():
    device = make_device(oom_above=4)
    points = sweep(device, (8, 16), SETTINGS, device.clock)
    assert [p.status for p in points] == ["oom", "oom"]
    assert representative_batch(DeviceProfile(config=device.config, points=tuple(points))) is None


@pytest.mark.parametrize("failure", [RuntimeError("CUDA error: an illegal memory access was encountered"),
                                     DeviceBroken("device lost"), ValueError("")])
def test_any_other_error_is_recorded_and_stops_the_device(failure):
    device = make_device(fail_at=64, fail_with=failure)
    points = sweep(device, SIZES, SETTINGS, device.clock)
    assert [(p.batch_size, p.status) for p in points] == [(8, "ok"), (16, "ok"), (32, "ok"), (64, "error")]
    assert device.prepared == [8, 16, 32, 64]
    assert points[-1].error.startswith(type(failure).__name__)
    assert str(failure) in points[-1].error


def test_a_device_that_cannot_release_gets_no_more_work():
    device = make_device()

    def broken_release():
        raise OutOfMemory("cannot free")

    device.release = broken_release
    points = sweep(device, (8, 16, 32), SETTINGS, device.clock)
    assert [p.status for p in points] == ["ok", "error"]
    assert "release after batch 8 failed" in points[1].error
    assert device.prepared == [8]


def test_points_are_streamed_as_they_are_measured():
    device = make_device(oom_above=16)
    seen = []
    points = sweep(device, (8, 16, 32, 64), SETTINGS, device.clock, on_point=seen.append)
    assert seen == points


def test_progress_names_the_device_and_batch():
    device = make_device(name="gpu")
    messages = []
    sweep(device, (8, 16), SETTINGS, device.clock, progress=messages.append)
    assert messages == ["fake:gpu: batch 8", "fake:gpu: batch 16"]


def test_default_sweep_is_geometric():
    assert geometric_batch_sizes() == (8, 16, 32, 64, 128, 256)
    assert geometric_batch_sizes(100) == (8, 16, 32, 64)
    assert geometric_batch_sizes(4) == (4,)


@pytest.mark.parametrize("bad", [[0], [8, -1], [8.0], [True], ["8"], []])
def test_bad_batch_sizes_are_user_errors(bad):
    with pytest.raises(UserInputError):
        check_batch_sizes(bad)


def test_representative_batch_is_the_largest_ok_size_up_to_128():
    device = make_device(oom_above=200)
    profile = DeviceProfile(config=device.config, points=tuple(sweep(device, SIZES, SETTINGS, device.clock)))
    assert representative_batch(profile) == 128
    assert representative_batch(profile, 100) == 64


# --- layout -------------------------------------------------------------------------------------


def test_default_thread_counts():
    assert default_thread_counts(1) == (1,)
    assert default_thread_counts(2) == (1, 2)
    assert default_thread_counts(6) == (1, 2, 4, 6)
    assert default_thread_counts(8) == (1, 2, 4, 8)


def test_cpu_only_layout_splits_the_cores_between_main_and_worker():
    layout = plan_layout(("cpu",), (0, 1), None, None)
    assert layout.main == DeviceConfig(device="cpu", threads=1, cores=(0,))
    assert [c.key for c in layout.configs] == ["cpu/1t", "cpu/2t"]
    assert layout.configs[1].cores == (0, 1)
    # The worker candidate runs on the core the main device does not use.
    assert layout.busy == (DeviceConfig(device="cpu", threads=1, cores=(1,)),)
    assert [c.key for c in layout.candidates] == ["cpu/1t", "cpu/2t"]


def test_cpu_only_layout_adds_the_main_thread_count_to_the_sweep():
    layout = plan_layout(("cpu",), (2, 3, 5, 7, 11, 13), (1, 6), None)
    assert layout.main == DeviceConfig(device="cpu", threads=3, cores=(2, 3, 5))
    assert [c.key for c in layout.configs] == ["cpu/3t", "cpu/1t", "cpu/6t"]
    assert [(c.threads, c.cores) for c in layout.busy] == [(1, (7,)), (3, (7, 11, 13))]


def test_single_core_main_and_worker_share_it():
    layout = plan_layout(("cpu",), (0,), None, None)
    assert layout.main.cores == (0,)
    assert layout.busy == (DeviceConfig(device="cpu", threads=1, cores=(0,)),)


def test_gpu_layout_puts_the_gpu_first_and_every_cpu_config_beside_it():
    layout = plan_layout(("cpu", "cuda:0", "cuda:1"), (0, 1, 2, 3), None, None)
    assert layout.main == DeviceConfig(device="cuda:0")
    assert [c.key for c in layout.configs] == ["cuda:0", "cpu/1t", "cpu/2t", "cpu/4t", "cuda:1"]
    assert [c.key for c in layout.busy] == ["cpu/1t", "cpu/2t", "cpu/4t", "cuda:1"]
    assert [c.key for c in layout.candidates] == ["cpu/1t", "cpu/2t", "cpu/4t", "cuda:1"]


def test_layout_rejects_bad_threads_and_a_main_device_not_profiled():
    with pytest.raises(UserInputError, match="exceeds the 2 usable cores"):
        plan_layout(("cpu",), (0, 1), (4,), None)
    with pytest.raises(UserInputError, match="0"):
        plan_layout(("cpu",), (0, 1), (0,), None)
    with pytest.raises(UserInputError, match="'cuda:1'"):
        plan_layout(("cpu",), (0, 1), None, "cuda:1")


def test_parse_devices():
    assert parse_devices(["cpu", "CUDA", "cuda:1", "cpu"]) == ("cpu", "cuda:0", "cuda:1")
    assert parse_devices("cpu,cuda:0") == ("cpu", "cuda:0")
    with pytest.raises(UserInputError, match="'tpu'"):
        parse_devices(["tpu"])
    with pytest.raises(UserInputError):
        parse_devices([])
