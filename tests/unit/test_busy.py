"""Busy-machine detection in the profiler, with fake /proc trees, fake clocks and fake probes:
never a busy machine and never a timing threshold."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from asam_tune.cli import render
from asam_tune.errors import RecordError
from asam_tune.profiler import busy, run
from asam_tune.profiler.busy import BusyMonitor, OtherJob, asam_tune_jobs, core_busy_ticks, flagged, process_ticks
from asam_tune.profiler.machine_load import busy_summary
from asam_tune.records import BatchPoint, DeviceConfig, Profile, parse_record
from tests.record_factories import small_profile, stats


# ----------------------------------------------------------------------------- a fake /proc

def _process(root: Path, pid: int, parent: int, argv: list[str], comm: str = "python", utime: int = 0,
             stime: int = 0) -> None:
    folder = root / str(pid)
    folder.mkdir(parents=True)
    (folder / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    (folder / "stat").write_text(f"{pid} ({comm}) S {parent} 1 1 0 -1 0 0 0 0 0 {utime} {stime} 0 0 20 0 1\n")


@pytest.fixture
def proc(tmp_path) -> Path:
    root = tmp_path / "proc"
    _process(root, 1, 0, ["/sbin/init"])
    _process(root, 50, 1, ["bash"])
    _process(root, 100, 50, ["/home/u/.venv/bin/python", "/home/u/.venv/bin/asam-tune", "profile", "-o", "a.json"])
    _process(root, 101, 100, ["/usr/bin/python3", "-m", "asam_tune.profiler.probe"])  # our probe
    _process(root, 60, 1, ["bash"])
    _process(root, 200, 60, ["/opt/venv/bin/asam-tune", "profile", "--workload", "mnist1d-cnn", "-o", "b.json"])
    _process(root, 201, 200, ["python3", "-m", "asam_tune.profiler.probe"], comm="python3 (probe) x")
    _process(root, 202, 200, ["python3", "-c", "from multiprocessing.spawn import spawn_main"])
    _process(root, 300, 60, ["python", "train.py", "--asam_tune"])  # mentions it, does not run it
    _process(root, 301, 60, ["python", "-m", "asam_tunes"])  # another package
    _process(root, 400, 1, ["python3", "-m", "asam_tune.bench.speed", "--steps", "30"])  # an orphan bench
    return root


def test_other_asam_tune_jobs_are_named_once_each(proc):
    jobs = asam_tune_jobs(proc_root=proc, own_pid=100)
    assert jobs == (OtherJob(200, "/opt/venv/bin/asam-tune profile --workload mnist1d-cnn -o b.json"),
                    OtherJob(400, "python3 -m asam_tune.bench.speed --steps 30"))
    assert str(jobs[0]).startswith("pid 200: /opt/venv/bin/asam-tune profile")


def test_our_own_tree_is_not_another_job(proc):
    # From our probe's point of view, we (its parent) are not another job either.
    assert [j.pid for j in asam_tune_jobs(proc_root=proc, own_pid=101)] == [200, 400]
    # A test runner that calls run_profile in-process: its parent chain holds no asam-tune.
    _process(proc, 500, 60, ["python", "-m", "pytest", "tests"])
    assert [j.pid for j in asam_tune_jobs(proc_root=proc, own_pid=500)] == [100, 200, 400]


def test_an_unreadable_or_missing_proc_finds_nothing(tmp_path):
    assert asam_tune_jobs(proc_root=tmp_path / "absent", own_pid=1) == ()


def test_cpu_ticks_from_proc_stat_and_a_process_stat(tmp_path, proc):
    stat = tmp_path / "stat"
    stat.write_text("cpu  40 0 10 1000 5 0 0 0 0 0\n"
                    "cpu0 10 1 2 500 3 4 5 6 0 0\n"
                    "cpu1 30 0 8 500 2 0 0 0 0 0\n")
    assert core_busy_ticks([0], stat_path=stat) == 10 + 1 + 2 + 4 + 5 + 6  # idle and iowait left out
    assert core_busy_ticks([0, 1], stat_path=stat) == 28 + 38
    assert core_busy_ticks([2], stat_path=stat) is None  # a core it does not list: unknown
    _process(proc, 700, 1, ["x"], comm="a ) b", utime=123, stime=7)
    assert process_ticks([700], proc_root=proc) == 130
    assert process_ticks([700, 999], proc_root=proc) is None


# ----------------------------------------------------------------------------- the monitor

class _Fakes:
    """A clock, the probe's cores' busy ticks and our own processes' ticks, all moved by the test."""

    def __init__(self) -> None:
        self.now, self.cores, self.own, self.jobs = 0.0, 1000, 500, []

    def monitor(self) -> BusyMonitor:
        return BusyMonitor(jobs=lambda: self.jobs, core_ticks=lambda cores: self.cores,
                           own_ticks=lambda pids: self.own, clock=lambda: self.now, ticks_per_s=100)

    def run(self, seconds: float, own_cores: float, other_cores: float) -> None:
        """``seconds`` pass with our processes busy on ``own_cores`` cores and others on ``other_cores``."""
        self.now += seconds
        self.own += round(100 * seconds * own_cores)
        self.cores += round(100 * seconds * (own_cores + other_cores))


def test_a_quiet_point_is_not_busy():
    fakes = _Fakes()
    monitor = fakes.monitor()
    monitor.begin((0, 1), (11, 12))
    fakes.run(2.0, own_cores=2.0, other_cores=0.05)  # kernel housekeeping
    assert monitor.end() is None


def test_other_processes_on_the_probes_cores_make_it_busy():
    fakes = _Fakes()
    monitor = fakes.monitor()
    monitor.begin((0, 1), (11,))
    fakes.run(2.0, own_cores=1.0, other_cores=1.0)  # a second job takes one of the two cores
    assert monitor.end() == "other processes used 50% of cores 0,1"
    fakes.run(1.0, own_cores=1.0, other_cores=0.0)  # end() began the next interval at once
    assert monitor.end() is None


def test_another_asam_tune_job_makes_it_busy_and_is_remembered():
    fakes = _Fakes()
    monitor = fakes.monitor()
    monitor.begin(None, (11,))  # a GPU probe: not pinned, only the job check applies
    fakes.jobs = [OtherJob(200, "asam-tune profile -o b.json")]
    fakes.run(1.0, own_cores=1.0, other_cores=5.0)
    assert monitor.end() == "another asam-tune job was running (pid 200: asam-tune profile -o b.json)"
    assert list(monitor.seen_jobs) == [200]


def test_too_short_or_unknown_intervals_say_nothing():
    fakes = _Fakes()
    monitor = fakes.monitor()
    monitor.begin((0,), (11,))
    fakes.run(busy.MIN_INTERVAL_S / 2, own_cores=0.0, other_cores=1.0)
    assert monitor.end() is None
    unknown = BusyMonitor(jobs=lambda: (), core_ticks=lambda cores: None, own_ticks=lambda pids: None,
                          clock=lambda: fakes.now)
    unknown.begin((0,), (11,))
    fakes.run(5.0, own_cores=0.0, other_cores=1.0)
    assert unknown.end() is None
    assert BusyMonitor(jobs=lambda: ()).end() is None  # never begun


# ----------------------------------------------------------------------------- the sweep

class _FakeProbe:
    """Streams 'ok' points for the sizes asked; fwd+bwd time grows with the attempt number."""

    attempts: dict[tuple[str, int], int] = {}

    def __init__(self, mode, config, request, **_):
        self.config, self.pid = config, 4242
        self._events = []
        for size in request["batch_sizes"]:
            attempt = self.attempts.get((config.key, size), 0)
            self.attempts[(config.key, size)] = attempt + 1
            seconds = 0.01 * size * (1 + attempt)
            point = BatchPoint(batch_size=size, status="ok", forward_backward=stats(seconds),
                               optimizer_step=stats(0.001))
            self._events.append({"event": "point", "point": json.loads(point.to_json()), "attempt": attempt})
        self._events.append({"event": "done"})
        self.closed = False

    def next_event(self, timeout_s):
        return self._events.pop(0)

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = True


class _ScriptedMonitor:
    """Busy for the (batch size, attempt) pairs it is given, in the order the points arrive."""

    def __init__(self, busy_at: set[tuple[int, int]], sizes: list[int]):
        self.busy_at, self.order = busy_at, []
        for attempt in range(3):
            self.order += [(size, attempt) for size in sizes]
        self.begun = []

    def begin(self, cores, pids):
        self.begun.append((cores, tuple(pids)))

    def end(self):
        size, attempt = self.order.pop(0)
        return "another asam-tune job was running (pid 200: asam-tune profile)" if (size, attempt) in self.busy_at else None


def _sweep(monkeypatch, sizes, busy_at, retried):
    _FakeProbe.attempts = {}
    monkeypatch.setattr(run, "ProbeProcess", _FakeProbe)
    updates = []
    tracker = run._Progress(updates.append, total=len(sizes))
    monitor = _ScriptedMonitor(busy_at, sizes)
    # The retry's points arrive after the first sweep's: script the order as they will come.
    monitor.order = [(s, 0) for s in sizes] + [(s, 1) for s in retried]
    config = DeviceConfig(device="cpu", threads=1, cores=(1,))
    points, probe = run._sweep_watched(config, {}, sizes, 10.0, tracker, monitor, serve=False)
    return points, updates, monitor


def test_a_busy_point_measured_quietly_again_is_replaced(monkeypatch):
    points, updates, monitor = _sweep(monkeypatch, [8, 32, 128], busy_at={(32, 0)}, retried=[32])
    by_size = {p.batch_size: p for p in points}
    assert [p.busy for p in points] == [None, None, None]
    assert by_size[32].forward_backward.median_s == pytest.approx(0.64)  # the second measurement
    assert by_size[8].forward_backward.median_s == pytest.approx(0.08)  # the first, untouched
    warnings = [u.message for u in updates if u.warning]
    assert warnings == ["cpu/1t: batch 32 measured while the machine was busy (another asam-tune job was running "
                        "(pid 200: asam-tune profile)); measuring again"]
    assert monitor.begun[0] == ((1,), (4242, run.os.getpid()))
    assert updates[-1].done == 3  # the retry did not count as more progress


def test_a_point_busy_twice_keeps_the_faster_measurement_flagged(monkeypatch):
    points, updates, _ = _sweep(monkeypatch, [8, 32], busy_at={(8, 0), (8, 1)}, retried=[8])
    first = points[0]
    assert first.batch_size == 8 and first.busy.startswith("another asam-tune job was running")
    assert first.forward_backward.median_s == pytest.approx(0.08)  # the faster of the two
    assert points[1].busy is None
    assert "busy again" in [u.message for u in updates if u.warning][-1]
    assert "flagged 'busy' in the profile" in [u.message for u in updates if u.warning][-1]


# ----------------------------------------------------------------------------- the record and show

def _busy_profile() -> Profile:
    profile = small_profile()
    device = profile.devices[0]
    points = (flagged(device.points[0], "other processes used 80% of core 0"),) + device.points[1:]
    return Profile.model_validate_json(
        profile.model_copy(update={"devices": (device.model_copy(update={"points": points}),) + profile.devices[1:]})
        .to_json())


def test_a_busy_flag_round_trips_and_plain_points_keep_their_hash():
    profile = _busy_profile()
    assert parse_record(Profile, json.loads(profile.to_json())) == profile
    assert [(key, p.batch_size) for key, p in profile.busy_points()] == [("cpu/1t", 8)]
    document = json.loads(small_profile().to_json())  # unset: left out, so old hashes hold
    assert all("busy" not in point for device in document["devices"] for point in device["points"])


def test_a_busy_flag_needs_timings_and_a_version_2_profile():
    with pytest.raises(ValueError, match="no timings to flag busy"):
        BatchPoint(batch_size=8, status="oom", busy="x")
    document = json.loads(_busy_profile().to_json())
    document["schema_version"] = 1
    document.pop("handovers", None)
    with pytest.raises(RecordError, match="busy points need schema_version 2"):
        parse_record(Profile, document)


def test_show_and_the_summary_name_the_busy_points():
    assert busy_summary(small_profile()) is None
    summary = busy_summary(_busy_profile())
    assert summary == "measured on a busy machine: 1 of 10 points measured while another job used their cores (cpu/1t)"
    out = io.StringIO()
    render.print_tables(render.profile_tables(_busy_profile()), Console(file=out, width=250))
    text = out.getvalue()
    assert "BUSY" in text and summary in text and "busy" in text.split("fwd+bwd")[1]
