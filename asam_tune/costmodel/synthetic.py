"""A synthetic GPU profile made from a real CPU profile, for planning what no machine here has
(no torch)::

    python -m asam_tune.costmodel.synthetic profiles/cpu-2core-mnist1d-cnn.json --speedup 30 \\
        -o profiles/synthetic-gpu30x-mnist1d-cnn.json

The profile is the source's, plus a device ``cuda:0`` that stands for a GPU main ``speedup``
times faster than one CPU core: every timing of the source's ``cpu/1t`` (forward+backward and
optimizer step, medians, spreads and samples) divided by ``speedup``. A real GPU is not a fast
CPU core (it is launch-bound at small batches, its optimizer step costs little); this keeps
the one ratio the question is about: how much of a batch one CPU core can process while the
GPU processes all of it.

What the machine would also measure, and this file sets:
- the transfers ``cuda:0 <-> cpu`` from a PCIe model: ``PCIE_LATENCY_S`` plus the parameter
  bytes over ``PCIE_BYTES_PER_S`` each way (pinned host memory);
- the handover to a CPU worker process, the source's (the main process's host-side work for
  the worker is the same whichever device it trains on; the profiler measures it that way too);
- no contention point for ``cuda:0``: the plan says it assumed none.

It is marked synthetic where the schema allows: the GPU's name and uuid and the fingerprint's
platform. The fingerprint differs from every real machine (one more GPU), so a plan made from
it is refused on any machine unless ``--allow-other-machine`` is given.
"""
from __future__ import annotations

import argparse
import sys

from asam_tune.errors import AsamTuneError, UserInputError
from asam_tune.records.base import dump_record, load_record
from asam_tune.records.fingerprint import GpuInfo
from asam_tune.records.profile import (
    BatchPoint, DeviceConfig, DeviceProfile, HandoverPoint, Profile, TimingStats, TransferPoint,
)

# A PCIe 4.0 x16 copy of pinned host memory: about 12 GB/s achieved, 10 us per copy.
PCIE_LATENCY_S = 10e-6
PCIE_BYTES_PER_S = 12e9
SOURCE_CONFIG = "cpu/1t"
GPU = "cuda:0"


def _scaled(stats: TimingStats | None, factor: float) -> TimingStats | None:
    if stats is None:
        return None
    return TimingStats(median_s=stats.median_s / factor, iqr_s=stats.iqr_s / factor,
                       samples_s=tuple(s / factor for s in stats.samples_s), noisy=stats.noisy)


def _copy_s(parameter_bytes: int) -> TimingStats:
    seconds = PCIE_LATENCY_S + parameter_bytes / PCIE_BYTES_PER_S
    return TimingStats(median_s=seconds, iqr_s=0.0, samples_s=(seconds,))


def synthetic_gpu_profile(source: Profile, speedup: float) -> Profile:
    """``source`` plus a ``cuda:0`` that is ``speedup`` times its ``cpu/1t`` (see the module docstring)."""
    if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not speedup > 1:
        raise UserInputError(f"Invalid speedup: {speedup!r} (a number > 1)")
    if source.fingerprint.gpus or any(not d.config.is_cpu for d in source.devices):
        raise UserInputError("the source profile must be a CPU-only one (it has a GPU)")
    try:
        cpu = source.device(SOURCE_CONFIG)
    except KeyError:
        raise UserInputError(f"the source profile has no {SOURCE_CONFIG} configuration to scale") from None
    label = f"{speedup:g}x"
    points = tuple(BatchPoint(batch_size=p.batch_size, status=p.status, error=p.error,
                              forward_backward=_scaled(p.forward_backward, speedup),
                              optimizer_step=_scaled(p.optimizer_step, speedup)) for p in cpu.points)
    gpu = DeviceProfile(config=DeviceConfig(device=GPU), points=points)
    parameter_bytes = next((t.parameter_bytes for t in source.transfers), 4 * source.workload.parameter_count)
    transfers = tuple(TransferPoint(source=GPU, target=d.config.key, parameter_bytes=parameter_bytes, pinned=True,
                                    to_target=_copy_s(parameter_bytes), to_source=_copy_s(parameter_bytes))
                      for d in source.devices if d.config.is_cpu)
    cpu_handover = next((h for h in source.handovers if h.perturbation == SOURCE_CONFIG), None)
    handovers = () if cpu_handover is None else (
        HandoverPoint(main=GPU, perturbation=SOURCE_CONFIG, per_step=cpu_handover.per_step),)
    fingerprint = source.fingerprint.model_copy(update=dict(
        gpus=(GpuInfo(index=0, name=f"SYNTHETIC GPU: {label} one core of {source.fingerprint.cpu.model or 'the CPU'} "
                                   f"(not a measured device)", uuid="synthetic"),),
        platform=f"SYNTHETIC profile: cuda:0 is the measured {SOURCE_CONFIG} divided by {speedup:g}; transfers from "
                 f"a PCIe model; made by asam_tune.costmodel.synthetic"))
    return Profile(schema_version=2, created_at=source.created_at, asam_tune_version=source.asam_tune_version,
                   fingerprint=fingerprint, workload=source.workload, settings=source.settings,
                   devices=(gpu,) + source.devices, transfers=transfers + source.transfers,
                   contention=source.contention, handovers=handovers + source.handovers,
                   machine_load=source.machine_load)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asam_tune.costmodel.synthetic",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a CPU-only profile JSON with a cpu/1t configuration")
    parser.add_argument("--speedup", type=float, default=30.0, help="how many times faster than one core (default 30)")
    parser.add_argument("--output", "-o", required=True, help="where to write the synthetic profile JSON")
    args = parser.parse_args(argv)
    try:
        profile = synthetic_gpu_profile(load_record(Profile, args.source), args.speedup)
        dump_record(profile, args.output)
    except AsamTuneError as exc:
        print(f"synthetic: error: {exc}", file=sys.stderr)
        return 2
    print(f"synthetic profile written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
