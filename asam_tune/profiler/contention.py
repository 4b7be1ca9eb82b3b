"""The main device's step alone and while a perturbation device computes at the same time.

On one machine the two share memory bandwidth, caches and (CPU-only) the socket, so the main
step slows down while the worker runs; the cost model needs that factor. The main step (one
forward+backward and optimizer step) is timed by the main device's probe, which is already
warm; the busy device runs forward+backward non-stop in its own probe process, on its own
cores. "Alone" is measured right before each "while busy", so slow drift of the machine
does not pass for contention.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from asam_tune.profiler.probe_process import ProbeFailed, ProbeProcess
from asam_tune.records.profile import ContentionPoint, DeviceConfig, DeviceProfile, TimingStats

MEASURE = json.dumps({"cmd": "measure"})
# The representative batch size: the largest that fits, up to this (a typical b_p and main batch).
REPRESENTATIVE_MAX_BATCH = 128


def representative_batch(profile: DeviceProfile, limit: int = REPRESENTATIVE_MAX_BATCH) -> int | None:
    """The largest 'ok' batch size <= ``limit``; None when there is none."""
    sizes = [p.batch_size for p in profile.ok_points() if p.batch_size <= limit]
    return max(sizes) if sizes else None


@dataclass(frozen=True)
class BusyCandidate:
    config: DeviceConfig  # where and how the busy probe runs (cores included)
    batch_size: int  # the batch it computes non-stop


def _stats(event: dict[str, Any]) -> TimingStats:
    return TimingStats.model_validate_json(json.dumps(event["stats"]))


def measure_contention(main_probe: ProbeProcess, main: DeviceConfig, batch_size: int,
                       candidates: Sequence[BusyCandidate], busy_request: dict[str, Any], *,
                       timeout_s: float, report: Callable[[str], None]) -> list[ContentionPoint]:
    """One point per candidate. ``main_probe`` serves steps at ``batch_size`` (it is prepared).

    A candidate whose probe fails is reported through ``report`` and left out; a failing main
    probe ends the measurement (``ProbeFailed`` propagates).
    """
    points = []
    for candidate in candidates:
        main_probe.send(MEASURE)
        alone = _stats(main_probe.wait_for("measured", timeout_s))
        request = {**busy_request, "batch_size": candidate.batch_size, "max_busy_s": timeout_s}
        try:
            busy = ProbeProcess("busy", candidate.config, request)
        except ProbeFailed as exc:
            report(f"contention with {candidate.config.key} not measured: {exc}")
            continue
        with busy:
            try:
                busy.wait_for("ready", timeout_s)
            except ProbeFailed as exc:
                report(f"contention with {candidate.config.key} not measured: {exc}")
                continue
            main_probe.send(MEASURE)
            loaded = _stats(main_probe.wait_for("measured", timeout_s))
            try:
                # 'done' proves the busy probe was computing the whole time.
                busy.send("stop")
                busy.wait_for("done", timeout_s)
            except ProbeFailed as exc:
                report(f"contention with {candidate.config.key} not measured: {exc}")
                continue
        points.append(ContentionPoint(main=main.key, busy=candidate.config.key, batch_size=batch_size,
                                      main_alone=alone, main_while_busy=loaded, main_cores=main.cores,
                                      busy_cores=candidate.config.cores))
    return points


__all__ = ["measure_contention", "representative_batch", "BusyCandidate", "REPRESENTATIVE_MAX_BATCH"]
