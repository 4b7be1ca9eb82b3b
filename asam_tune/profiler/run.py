"""``run_profile``: every measurement of one workload on one machine, as a ``Profile``.

Order of work (nothing is measured while another measurement runs, except on purpose in
the contention step):

1. the main device's sweep, in a probe that then stays up, idle, to time main steps later;
2. the sweep of every other configuration, one probe process after another;
3. weight/perturbation transfers, timed by the main probe;
4. handovers: the main probe hands jobs to a real CPU worker on each CPU candidate's cores;
5. contention: the main probe's step alone and while each candidate is busy.

With ``ascent_dtype`` (the dtype ``AsyncSAM(ascent_dtype=...)`` will run the ascent in), every
perturbation candidate is swept once more after step 2 with its forward under autocast to that
dtype (``DeviceProfile.ascent_points``), and the candidates are busy under it in step 5: the
main step's own points stay in the parameters' dtype.

The machine's load averages are read before step 1 and after step 5 and recorded; a busy
machine (another job) is reported as a warning, and the profile goes on. Around every point of
the sweeps ``busy.BusyMonitor`` looks for another asam-tune job and for other processes on the
probe's cores: a busy point is measured again once, and flagged in the profile if it is still
busy.

The main device is the first CUDA device when one is asked for; on a CPU-only machine the
main process and the CPU worker split the usable cores, so the main device is the CPU on the
first half of the cores and the candidates run on the rest.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import asam_tune
from asam_tune.errors import UserInputError
from asam_tune.fingerprint import collect_fingerprint, usable_core_ids
from asam_tune.profiler.busy import BusyMonitor, flagged, merge_remeasured
from asam_tune.profiler.contention import BusyCandidate, measure_contention, representative_batch
from asam_tune.profiler.machine_load import LoadSource, LoadWatch, end_warning
from asam_tune.profiler.probe_process import ProbeFailed, ProbeProcess
from asam_tune.profiler.sweep import QUICK_BATCH_SIZES, check_batch_sizes, geometric_batch_sizes
from asam_tune.records.profile import (BatchPoint, ascent_dtype_name, DeviceConfig, DeviceProfile, HandoverPoint, Profile,
                                      ProfileSettings, TimingStats, TransferPoint)
from asam_tune.timing import MeasureSettings

DEFAULT_SETTINGS = MeasureSettings(warmup=2, min_time_s=0.5, min_repeats=5, max_repeats=50, noise_threshold=0.1)
QUICK_SETTINGS = MeasureSettings(warmup=1, min_time_s=0.1, min_repeats=3, max_repeats=20, noise_threshold=0.1)
# Contention is timed at the largest batch that ran up to this size (``quick``: a smaller one,
# as each contention point starts a process and times two series of whole steps).
CONTENTION_MAX_BATCH = 128
QUICK_CONTENTION_MAX_BATCH = 32
# No single answer from a probe (a point, a step measurement) may take longer than this.
DEFAULT_PROBE_TIMEOUT_S = 600.0
_CUDA = re.compile(r"^cuda(:\d+)?$")


@dataclass(frozen=True)
class ProgressUpdate:
    """What the profiler is doing: ``message``, and ``done`` of about ``total`` steps.

    ``warning``: the message is something the user should see even without a progress bar
    (e.g. the machine is busy), not just what is being done.
    """

    message: str
    done: int
    total: int
    warning: bool = False

    def __str__(self) -> str:
        return self.message


class _Progress:
    def __init__(self, callback: Callable[[ProgressUpdate], None] | None, total: int):
        self._callback = callback
        self.total = total
        self.done = 0

    def step(self, message: str, advance: int = 1) -> None:
        self.done = min(self.done + advance, self.total)
        self.say(message)

    def say(self, message: str) -> None:
        if self._callback is not None:
            self._callback(ProgressUpdate(message, self.done, self.total))

    def warn(self, message: str | None) -> None:
        """Report ``message`` as a warning; None: nothing to warn about."""
        if message is not None and self._callback is not None:
            self._callback(ProgressUpdate(message, self.done, self.total, warning=True))


def default_thread_counts(usable: int) -> tuple[int, ...]:
    """1, 2, 4, ... below the usable cores, and the usable cores themselves."""
    counts = []
    k = 1
    while k < usable:
        counts.append(k)
        k *= 2
    counts.append(usable)
    return tuple(counts)


def parse_devices(devices: Iterable[str]) -> tuple[str, ...]:
    """'cpu' and 'cuda:N' ('cuda' means 'cuda:0'), each once, in the given order."""
    if isinstance(devices, str):
        devices = [d for d in devices.split(",") if d.strip()]
    result: list[str] = []
    for raw in devices:
        name = str(raw).strip().lower()
        if name == "cuda":
            name = "cuda:0"
        if name != "cpu" and not _CUDA.match(name):
            raise UserInputError(f"unknown device {raw!r}: expected cpu or cuda:N")
        if name not in result:
            result.append(name)
    if not result:
        raise UserInputError("no device to profile: give at least one of cpu, cuda:N")
    return tuple(result)


def _check_cuda(devices: Sequence[str]) -> None:
    wanted = [d for d in devices if d.startswith("cuda")]
    if not wanted:
        return
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for name in wanted:
        if int(name.split(":")[1]) >= available:
            raise UserInputError(f"device {name!r} is not available: this machine has {available} CUDA device(s)")


def _check_threads(cpu_threads: Iterable[object], usable: int) -> tuple[int, ...]:
    counts = list(cpu_threads)
    for k in counts:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UserInputError(f"CPU thread counts must be positive integers, got {k!r}")
        if k > usable:
            raise UserInputError(f"CPU thread count {k} exceeds the {usable} usable cores")
    if not counts:
        raise UserInputError("at least one CPU thread count is needed, got none")
    return tuple(sorted(set(counts)))


@dataclass(frozen=True)
class _Layout:
    main: DeviceConfig
    configs: tuple[DeviceConfig, ...]  # every configuration to sweep, main first
    busy: tuple[DeviceConfig, ...]  # candidates that can run beside the main device, as placed

    @property
    def candidates(self) -> tuple[DeviceConfig, ...]:
        """Every configuration the perturbation could run on (the transfer targets)."""
        cpu = [c for c in self.configs if c.is_cpu]
        return tuple(cpu + [c for c in self.configs if not c.is_cpu and c != self.main])

    @property
    def ascent_candidates(self) -> tuple[DeviceConfig, ...]:
        """The configurations an ascent may run on: the candidates, and a GPU main's own (SAM's ascent in the
        baseline, a second stream)."""
        own = () if self.main.is_cpu else (self.main,)
        return own + self.candidates

    @property
    def cpu_workers(self) -> tuple[DeviceConfig, ...]:
        """The CPU candidates beside the main device, as placed: where a worker process would run."""
        return tuple(c for c in self.busy if c.is_cpu)


def plan_layout(devices: Sequence[str], cores: Sequence[int], cpu_threads: Sequence[int] | None,
                main_device: str | None) -> _Layout:
    """Which configurations are swept, which one is the main device, what runs beside it."""
    cores = tuple(cores)
    n = len(cores)
    threads = _check_threads(cpu_threads, n) if cpu_threads is not None else default_thread_counts(n)
    gpus = [d for d in devices if d != "cpu"]
    if main_device is None:
        main_device = gpus[0] if gpus else "cpu"
    main_device = parse_devices([main_device])[0]
    if main_device not in devices:
        raise UserInputError(f"main device {main_device!r} is not among the profiled devices {list(devices)}")
    if main_device == "cpu":
        # CPU only: the main process takes the first half of the cores, the worker the rest.
        main_threads = max(1, n // 2)
        threads = tuple(sorted(set(threads) | {main_threads}))
        main = DeviceConfig(device="cpu", threads=main_threads, cores=cores[:main_threads])
        beside = cores[main_threads:] or cores  # one core: they can only share it
    else:
        main = DeviceConfig(device=main_device)
        beside = cores
    cpu_configs = [DeviceConfig(device="cpu", threads=k, cores=cores[:k]) for k in threads] if "cpu" in devices else []
    gpu_configs = [DeviceConfig(device=g) for g in gpus if g != main.device]
    configs = [main] + [c for c in cpu_configs if c != main] + gpu_configs
    # Candidates for the perturbation: every CPU configuration that fits beside the main
    # device (placed on the cores it would get there), and every other GPU.
    busy = [DeviceConfig(device="cpu", threads=c.threads, cores=beside[:c.threads])
            for c in cpu_configs if c.threads <= len(beside)]
    busy += gpu_configs
    return _Layout(main, tuple(configs), tuple(busy))


def _workload_request(spec: str, input_shape: Sequence[int] | None, num_classes: int | None) -> dict[str, Any]:
    return {"spec": spec, "input_shape": list(input_shape) if input_shape else None, "num_classes": num_classes}


def _receive_sweep(probe: ProbeProcess, sizes: Sequence[int], timeout_s: float,
                   progress: _Progress, monitor: BusyMonitor | None = None,
                   advance: int = 1) -> tuple[list[BatchPoint], bool]:
    """The points a sweep probe streams, and whether the probe failed.

    A failing probe (crash, hang, reported exception) gives an 'error' point at the first
    size it did not answer for, and its sweep ends there. With ``monitor`` each point carries
    why the machine was busy while it was measured (``BatchPoint.busy``), if it was.
    """
    points: list[BatchPoint] = []
    if monitor is not None:
        monitor.begin(probe.config.cores, (probe.pid, os.getpid()))
    try:
        while True:
            event = probe.next_event(timeout_s)
            if event["event"] == "done":
                return points, False
            if event["event"] != "point":
                raise ProbeFailed(f"{probe.config.key} probe said {event['event']!r} during its sweep")
            point = BatchPoint.model_validate_json(json.dumps(event["point"]))
            if monitor is not None:
                point = flagged(point, monitor.end())
            points.append(point)
            progress.step(f"{probe.config.key}: batch {point.batch_size} {point.status}"
                          + (" (busy)" if point.busy else ""), advance=advance)
    except ProbeFailed as exc:
        done = {p.batch_size for p in points}
        pending = [s for s in sizes if s not in done]
        if pending:
            points.append(BatchPoint(batch_size=pending[0], status="error", error=str(exc)))
        progress.step(f"{probe.config.key}: {exc}", advance=advance * len(pending))
        return points, True


def _sweep_in_probe(config: DeviceConfig, request: dict[str, Any], sizes: Sequence[int], timeout_s: float,
                    progress: _Progress, *, serve: bool, monitor: BusyMonitor | None = None,
                    advance: int = 1) -> tuple[list[BatchPoint], ProbeProcess | None]:
    """Run one configuration's sweep; with ``serve`` the probe is returned, still running."""
    progress.say(f"{config.key}: starting its probe process")
    try:
        probe = ProbeProcess("sweep", config, {**request, "batch_sizes": list(sizes), "serve": serve})
    except ProbeFailed as exc:
        progress.say(f"{config.key}: {exc}")
        return [BatchPoint(batch_size=sizes[0], status="error", error=str(exc))], None
    try:
        points, failed = _receive_sweep(probe, sizes, timeout_s, progress, monitor, advance)
    except BaseException:  # e.g. KeyboardInterrupt: no probe is left behind
        probe.abort()
        raise
    if failed:
        probe.abort()
        return points, None
    if serve:
        return points, probe
    probe.close()
    return points, None


def _sizes_text(points: Iterable[BatchPoint]) -> str:
    return ", ".join(str(p.batch_size) for p in points)


def _sweep_watched(config: DeviceConfig, request: dict[str, Any], sizes: Sequence[int], timeout_s: float,
                   progress: _Progress, monitor: BusyMonitor,
                   *, serve: bool) -> tuple[list[BatchPoint], ProbeProcess | None]:
    """One configuration's sweep; its busy points measured once more in a fresh probe, and
    flagged when they are busy again."""
    points, probe = _sweep_in_probe(config, request, sizes, timeout_s, progress, serve=serve, monitor=monitor)
    busy = [p for p in points if p.busy]
    if not busy:
        return points, probe
    progress.warn(f"{config.key}: batch {_sizes_text(busy)} measured while the machine was busy ({busy[0].busy}); "
                  "measuring again")
    again, _ = _sweep_in_probe(config, request, [p.batch_size for p in busy], timeout_s, progress, serve=False,
                               monitor=monitor, advance=0)
    points = merge_remeasured(points, again)
    still = [p for p in points if p.busy]
    if still:
        progress.warn(f"{config.key}: batch {_sizes_text(still)} busy again ({still[0].busy}): flagged 'busy' in "
                      "the profile; profile again on a quiet machine for numbers to trust")
    return points, probe


def run_profile(workload_spec: str, *, devices: Iterable[str] = ("cpu",), cpu_threads: Iterable[int] | None = None,
                batch_sizes: Iterable[int] | None = None, quick: bool = False, main_device: str | None = None,
                input_shape: Sequence[int] | None = None, num_classes: int | None = None,
                progress: Callable[[ProgressUpdate], None] | None = None,
                settings: MeasureSettings | None = None,
                probe_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S,
                load_average: LoadSource | None = None, busy_monitor: BusyMonitor | None = None,
                ascent_dtype: str | None = None) -> Profile:
    """Measure ``workload_spec`` on ``devices`` and return the profile (nothing is written).

    ``cpu_threads`` defaults to 1, 2, 4, ... up to the usable cores; ``batch_sizes`` to
    8, 16, ..., 256 (``quick``: 8, 32, 128, and shorter timings). Every measurement runs in
    a probe process on the real clock (the parts are tested with a fake clock one by one).
    User mistakes raise ``UserInputError`` subclasses before anything is measured.
    ``load_average`` replaces ``os.getloadavg`` (tests); a busy machine is reported to
    ``progress`` as a warning at the start and at the end, and recorded in ``machine_load``.
    ``busy_monitor`` (default: the real one) watches each sweep point; see ``busy.py``.
    ``ascent_dtype`` ('bfloat16', 'float16'): also measure the candidates' ascent in it.
    """
    from asam_tune.profiler.transfers import trainable_numel_and_dtype
    from asam_tune.workloads import describe, load_workload

    device_names = parse_devices(devices)
    _check_cuda(device_names)
    ascent_dtype = ascent_dtype_name(ascent_dtype)
    if batch_sizes is not None:
        sizes = check_batch_sizes(batch_sizes)
    else:
        sizes = QUICK_BATCH_SIZES if quick else geometric_batch_sizes()
    settings = settings or (QUICK_SETTINGS if quick else DEFAULT_SETTINGS)
    cores = usable_core_ids()
    layout = plan_layout(device_names, cores, tuple(cpu_threads) if cpu_threads is not None else None, main_device)
    workload = load_workload(workload_spec, input_shape=input_shape, num_classes=num_classes)
    model = workload.build()
    descriptor = describe(workload, model)
    numel, dtype = trainable_numel_and_dtype(model)
    weights = _Weights(numel, str(dtype).removeprefix("torch."), numel * dtype.itemsize)
    request = {
        "workload": _workload_request(workload_spec, input_shape, num_classes),
        "settings": {"warmup": settings.warmup, "min_time_s": settings.min_time_s,
                     "min_repeats": settings.min_repeats, "max_repeats": settings.max_repeats,
                     "noise_threshold": settings.noise_threshold},
    }
    ascent_configs = layout.ascent_candidates if ascent_dtype is not None else ()
    tracker = _Progress(progress, total=(len(layout.configs) + len(ascent_configs)) * len(sizes) + 1
                        + len(layout.cpu_workers) + len(layout.busy))

    # After every check of the user's input (a mistake is one error line, not a warning and an
    # error), right before the first probe starts.
    watch = LoadWatch(len(cores), load_average)
    tracker.warn(watch.start_warning())
    monitor = busy_monitor or BusyMonitor()
    others = monitor.other_jobs()
    if others:
        tracker.warn(f"another asam-tune job is running ({'; '.join(map(str, others))}): the two slow each other "
                     "down; points measured beside it are measured again, and flagged if still busy")

    profiles: dict[str, DeviceProfile] = {}
    main_probe: ProbeProcess | None = None
    try:
        for index, config in enumerate(layout.configs):
            points, probe = _sweep_watched(config, request, sizes, probe_timeout_s, tracker, monitor, serve=index == 0)
            if index == 0:
                main_probe = probe
            profiles[config.key] = DeviceProfile(config=config, points=tuple(points))
        ascent_request = {**request, "autocast": ascent_dtype}
        for config in ascent_configs:
            tracker.say(f"{config.key}: the ascent under autocast to {ascent_dtype}")
            points, _ = _sweep_watched(config, ascent_request, sizes, probe_timeout_s, tracker, monitor, serve=False)
            profiles[config.key] = profiles[config.key].model_copy(update={"ascent_points": tuple(points)})

        tracker.say("transfers: weights to each candidate device and back")
        transfers = _transfers(layout, main_probe, weights, probe_timeout_s, tracker)
        handovers = _handovers(layout, main_probe, probe_timeout_s, tracker)

        limit = QUICK_CONTENTION_MAX_BATCH if quick else CONTENTION_MAX_BATCH
        busy_request = ascent_request if ascent_dtype is not None else request
        contention = _contention(layout, profiles, main_probe, busy_request, probe_timeout_s, tracker, limit)
    finally:
        if main_probe is not None:
            main_probe.close()
    # Once every probe is closed, so the profiler's own CPU time is all counted.
    machine_load = watch.finish()
    tracker.warn(end_warning(machine_load))

    return Profile(
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        asam_tune_version=asam_tune.__version__,
        fingerprint=collect_fingerprint(),
        workload=descriptor,
        settings=ProfileSettings(warmup=settings.warmup, min_time_s=settings.min_time_s,
                                 min_repeats=settings.min_repeats, noise_threshold=settings.noise_threshold,
                                 quick=quick),
        devices=tuple(profiles[c.key] for c in layout.configs),
        transfers=tuple(transfers),
        contention=tuple(contention),
        handovers=tuple(handovers),
        machine_load=machine_load,
        ascent_dtype=ascent_dtype,
    )



@dataclass(frozen=True)
class _Weights:
    numel: int
    dtype: str  # torch dtype name, e.g. 'float32'
    bytes: int


def _stats(document: dict[str, Any]) -> TimingStats:
    return TimingStats.model_validate_json(json.dumps(document))


def _transfers(layout: _Layout, main_probe: ProbeProcess | None, weights: _Weights, timeout_s: float,
               tracker: _Progress) -> list[TransferPoint]:
    """The main probe copies the weights to each candidate device and back (its threads, its cores)."""
    if main_probe is None:
        tracker.step("transfers not measured: the main device's probe is not running")
        return []
    targets = list(dict.fromkeys(c.device for c in layout.candidates))
    try:
        main_probe.send(json.dumps({"cmd": "transfers", "numel": weights.numel, "dtype": weights.dtype,
                                    "targets": targets}))
        results = main_probe.wait_for("transfers", timeout_s)["results"]
    except ProbeFailed as exc:
        tracker.step(f"transfers not measured: {exc}")
        return []
    tracker.step("transfers measured")
    return [TransferPoint(source=layout.main.key, target=c.key, parameter_bytes=weights.bytes,
                          pinned=results[c.device]["pinned"], to_target=_stats(results[c.device]["to_target"]),
                          to_source=_stats(results[c.device]["to_source"]))
            for c in layout.candidates]


def _handovers(layout: _Layout, main_probe: ProbeProcess | None, timeout_s: float,
               tracker: _Progress) -> list[HandoverPoint]:
    """The main probe times its per-step handover to a real worker on each CPU candidate."""
    workers = layout.cpu_workers
    if main_probe is None:
        tracker.step("handovers not measured: the main device's probe is not running", advance=len(workers))
        return []
    points = []
    for index, config in enumerate(workers):
        tracker.say(f"handover: {layout.main.key} to a worker process on {config.key}")
        command = {"cmd": "handover", "threads": config.threads, "cores": list(config.cores or ())}
        try:
            main_probe.send(json.dumps(command))
            answer = main_probe.wait_for("handover", timeout_s)
        except ProbeFailed as exc:  # the main probe itself: nothing more can be measured
            tracker.step(f"handovers not measured: {exc}", advance=len(workers) - index)
            break
        if "error" in answer:  # e.g. the worker could not start: the profile goes on without it
            tracker.step(f"handover to {config.key} not measured: {answer['error']}")
            continue
        points.append(HandoverPoint(main=layout.main.key, perturbation=config.key,
                                    per_step=_stats(answer["stats"]), weights_on=answer.get("weights_on")))
        tracker.step(f"handover to {config.key} measured")
    return points


def _contention(layout: _Layout, profiles: dict[str, DeviceProfile], main_probe: ProbeProcess | None,
                request: dict[str, Any], timeout_s: float, tracker: _Progress, limit: int) -> list:
    main_batch = representative_batch(profiles[layout.main.key], limit)
    if main_probe is None or main_batch is None or not layout.busy:
        tracker.step("contention: nothing to measure beside the main device", advance=len(layout.busy))
        return []
    candidates = []
    for config in layout.busy:
        busy_batch = representative_batch(profiles[config.key], limit)
        if busy_batch is None:
            tracker.step(f"contention with {config.key}: skipped, it has no batch size that runs")
        else:
            candidates.append(BusyCandidate(config, busy_batch))
    try:
        main_probe.send(json.dumps({"cmd": "prepare", "batch_size": main_batch}))
        main_probe.wait_for("ready", timeout_s)
    except ProbeFailed as exc:
        tracker.step(f"contention not measured: {exc}", advance=len(candidates))
        return []

    points = []
    for index, candidate in enumerate(candidates):
        key = candidate.config.key
        tracker.say(f"contention: {layout.main.key} at batch {main_batch} while {key} is busy")
        try:
            measured = measure_contention(main_probe, layout.main, main_batch, [candidate], request,
                                          timeout_s=timeout_s, report=tracker.say)
        except ProbeFailed as exc:  # the main probe itself: nothing more can be measured
            tracker.step(f"contention not measured: {exc}", advance=len(candidates) - index)
            break
        points += measured
        tracker.step(f"contention with {key} measured" if measured else f"contention with {key} not measured")
    return points

__all__ = ["run_profile", "ProgressUpdate", "plan_layout", "default_thread_counts", "parse_devices",
           "DEFAULT_SETTINGS", "QUICK_SETTINGS"]
