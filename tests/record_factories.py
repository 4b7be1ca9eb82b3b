"""Hand-made, valid records for tests (no torch)."""
from __future__ import annotations

from asam_tune.records import (
    BatchPoint, ContentionPoint, CpuInfo, DeviceConfig, DeviceProfile, Fingerprint, HandoverPoint, MachineLoad,
    Profile, ProfileSettings, TimingStats, TransferPoint, WorkloadDescriptor,
)


def stats(seconds: float) -> TimingStats:
    return TimingStats(median_s=seconds, iqr_s=0.0, samples_s=(seconds,) * 3)


def fingerprint(cores: int = 2) -> Fingerprint:
    return Fingerprint(cpu=CpuInfo(model="Test CPU", physical_cores=cores, logical_cores=cores,
                                   affinity=tuple(range(cores)), usable_cores=cores),
                       python_version="3.11.7", torch_version="2.13.0")


def affine_device(config: DeviceConfig, a: float, b: float, opt: float,
                  batch_sizes=(8, 16, 32, 64, 128)) -> DeviceProfile:
    return DeviceProfile(config=config, points=tuple(
        BatchPoint(batch_size=n, status="ok", forward_backward=stats(a + b * n), optimizer_step=stats(opt))
        for n in batch_sizes))


def small_profile() -> Profile:
    cpu1 = DeviceConfig(device="cpu", threads=1, cores=(0,))
    cpu2 = DeviceConfig(device="cpu", threads=2, cores=(0, 1))
    return Profile(
        created_at="2026-11-27T00:00:00Z",
        asam_tune_version="0.1.0",
        fingerprint=fingerprint(),
        workload=WorkloadDescriptor(name="mnist1d-cnn", input_shape=(40,), num_classes=10,
                                    parameter_count=20000, parameter_shapes_hash="abc", dtype="float32"),
        settings=ProfileSettings(warmup=2, min_time_s=0.1, min_repeats=3, noise_threshold=0.1),
        devices=(
            affine_device(cpu1, 0.001, 0.0001, 0.0002),
            affine_device(cpu2, 0.001, 0.00006, 0.0002),
            DeviceProfile(config=DeviceConfig(device="cpu", threads=4),
                          points=(BatchPoint(batch_size=8, status="oom"),
                                  BatchPoint(batch_size=16, status="error", error="boom"))),
        ),
        transfers=(TransferPoint(source="cpu/1t", target="cpu/1t", parameter_bytes=80000, pinned=False,
                                 to_target=stats(1e-5), to_source=stats(1e-5)),),
        contention=(ContentionPoint(main="cpu/1t", busy="cpu/1t", batch_size=64,
                                    main_alone=stats(0.0074), main_while_busy=stats(0.008)),),
    )


def with_handover(profile: Profile, seconds: float = 3e-4) -> Profile:
    """``profile`` (schema version 2) with a handover from its first device to a 1-thread worker."""
    point = HandoverPoint(main=profile.devices[0].config.key, perturbation="cpu/1t", per_step=stats(seconds))
    return Profile.model_validate_json(profile.model_copy(update={"handovers": (point,)}).to_json())


def machine_load(start=(0.2, 0.3, 0.4), end=(0.6, 0.4, 0.4), cores: int = 2, elapsed_s: float = 12.0,
                 busy_cores: float = 1.2) -> MachineLoad:
    return MachineLoad(start=start, end=end, usable_cores=cores, elapsed_s=elapsed_s, profiler_busy_cores=busy_cores)


def with_machine_load(profile: Profile, load: MachineLoad | None = None) -> Profile:
    """``profile`` (schema version 2) with the machine's load and its contention cores recorded."""
    contention = tuple(c.model_copy(update={"main_cores": (0,), "busy_cores": (1,)}) for c in profile.contention)
    updated = profile.model_copy(update={"machine_load": load or machine_load(), "contention": contention})
    return Profile.model_validate_json(updated.to_json())
