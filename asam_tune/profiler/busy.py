"""Was the machine busy while a point was measured? Another asam-tune job, or other processes on
the probe's cores.

Two profiles run at once inflated points up to 500x, and nothing in the timings said so (the
load average lags by a minute and is machine-wide). So around every point of a sweep the
profiler asks two questions of the kernel, both of which answer at once:

- Is another asam-tune job running? Every process whose command line runs asam-tune (the
  console script, or ``python -m asam_tune...``) that is not this one, an ancestor or a
  descendant; only the topmost of each tree is named.
- Did other processes use the probe's cores? The busy CPU time of those cores (/proc/stat)
  over the point, less the CPU time of the probe and of this process (/proc/PID/stat), as a
  share of the cores' time. Above ``OTHERS_SHARE`` the point was measured beside another job.

A busy point is measured again once, in a fresh probe; one still busy is kept flagged
(``BatchPoint.busy``). Every source (the /proc root, the clock) is injectable: the tests use
fake /proc trees and fake clocks, never a busy machine. No torch import.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from asam_tune.records.profile import BatchPoint

# Other processes' share of the probe's cores above which a point counts as busy. Well above
# the kernel's own housekeeping (a few percent), well below one competing busy thread per core.
OTHERS_SHARE = 0.25
# Too short an interval has too few clock ticks (10 ms each) for a share to mean anything.
MIN_INTERVAL_S = 0.2
_COMMAND_CHARS = 100


@dataclass(frozen=True)
class OtherJob:
    pid: int
    command: str

    def __str__(self) -> str:
        return f"pid {self.pid}: {self.command}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:  # gone, or not ours to read
        return None


def _parent(proc: Path, pid: int) -> int | None:
    """The parent pid from /proc/PID/stat (the command name may hold spaces and parentheses)."""
    text = _read(proc / str(pid) / "stat")
    if not text:
        return None
    fields = text.rpartition(")")[2].split()
    try:
        return int(fields[1])
    except (IndexError, ValueError):
        return None


def _runs_asam_tune(argv: Sequence[str]) -> bool:
    for index, arg in enumerate(argv):
        if Path(arg).name == "asam-tune":
            return True
        if arg == "-m" and index + 1 < len(argv) and argv[index + 1].split(".")[0] == "asam_tune":
            return True
    return False


def asam_tune_jobs(*, proc_root: str | os.PathLike = "/proc", own_pid: int | None = None) -> tuple[OtherJob, ...]:
    """Other asam-tune jobs on this machine: not ``own_pid`` (default: this process), its
    ancestors or its descendants. A job's own children (its probes, its workers) are not listed
    apart from it."""
    proc = Path(proc_root)
    own = os.getpid() if own_pid is None else own_pid
    parents: dict[int, int | None] = {}
    commands: dict[int, list[str]] = {}
    try:
        entries = [int(p.name) for p in proc.iterdir() if p.name.isdigit()]
    except OSError:
        return ()
    for pid in entries:
        raw = _read(proc / str(pid) / "cmdline")
        if raw is None:
            continue
        parents[pid] = _parent(proc, pid)
        commands[pid] = [part for part in raw.split("\0") if part]

    def lineage(pid: int) -> list[int]:
        chain, seen = [pid], {pid}
        while (parent := parents.get(chain[-1])) and parent not in seen:
            chain.append(parent)
            seen.add(parent)
        return chain

    ancestors = set(lineage(own))
    matching = {pid for pid, argv in commands.items() if _runs_asam_tune(argv)}
    jobs = []
    for pid in sorted(matching):
        chain = lineage(pid)
        if own in chain or pid in ancestors:
            continue  # ourselves, what started us, or what we started
        if any(p in matching for p in chain[1:]):
            continue  # named through its topmost asam-tune ancestor
        jobs.append(OtherJob(pid, " ".join(commands[pid])[:_COMMAND_CHARS]))
    return tuple(jobs)


def core_busy_ticks(cores: Iterable[int], *, stat_path: str | os.PathLike = "/proc/stat") -> int | None:
    """Clock ticks the given cores spent not idle since boot (user, nice, system, irq, softirq and
    steal: a hypervisor giving the core to another machine is contention too). None: unknown."""
    text = _read(Path(stat_path))
    if text is None:
        return None
    wanted = {f"cpu{core}" for core in cores}
    total, found = 0, set()
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0] not in wanted:
            continue
        values = [int(v) for v in fields[1:9]]
        values += [0] * (8 - len(values))
        user, nice, system, _idle, _iowait, irq, softirq, steal = values
        total += user + nice + system + irq + softirq + steal
        found.add(fields[0])
    return total if found == wanted else None


def process_ticks(pids: Iterable[int], *, proc_root: str | os.PathLike = "/proc") -> int | None:
    """utime + stime of the given processes (every thread of each), in clock ticks. None: unknown."""
    total = 0
    for pid in pids:
        text = _read(Path(proc_root) / str(pid) / "stat")
        if text is None:
            return None
        fields = text.rpartition(")")[2].split()
        try:
            total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), after pid and comm
        except (IndexError, ValueError):
            return None
    return total


def _ticks_per_second() -> int:
    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):
        return 100


@dataclass
class _Interval:
    cores: tuple[int, ...] | None
    pids: tuple[int, ...]
    started: float
    core_ticks: int | None
    own_ticks: int | None


class BusyMonitor:
    """Brackets each measurement: ``begin(cores, pids)`` before it, ``end()`` after it gives why the
    machine was busy meanwhile, or None. ``pids`` are ours (the probe, this process)."""

    def __init__(self, *, jobs: Callable[[], Sequence[OtherJob]] = asam_tune_jobs,
                 core_ticks: Callable[[Sequence[int]], int | None] = core_busy_ticks,
                 own_ticks: Callable[[Sequence[int]], int | None] = process_ticks,
                 clock: Callable[[], float] = time.monotonic, ticks_per_s: int | None = None,
                 others_share: float = OTHERS_SHARE):
        self._jobs, self._core_ticks, self._own_ticks, self._clock = jobs, core_ticks, own_ticks, clock
        self._ticks_per_s = ticks_per_s or _ticks_per_second()
        self._others_share = others_share
        self._interval: _Interval | None = None
        self.seen_jobs: dict[int, OtherJob] = {}

    def other_jobs(self) -> tuple[OtherJob, ...]:
        found = tuple(self._jobs())
        self.seen_jobs.update((job.pid, job) for job in found)
        return found

    def begin(self, cores: Sequence[int] | None, pids: Sequence[int]) -> None:
        cores = tuple(cores) if cores else None
        pids = tuple(pids)
        self._interval = _Interval(cores, pids, self._clock(),
                                   self._core_ticks(cores) if cores else None,
                                   self._own_ticks(pids) if cores else None)

    def end(self) -> str | None:
        """Why the interval since ``begin`` was busy ('; '-joined), or None; starts the next
        interval on the same cores and processes at once (sweeps are back to back)."""
        interval = self._interval
        if interval is None:
            return None
        reasons = []
        jobs = self.other_jobs()
        if jobs:
            reasons.append(f"another asam-tune job was running ({'; '.join(map(str, jobs))})")
        share = self._others_share_since(interval)
        if share is not None and share > self._others_share:
            cores = ",".join(map(str, interval.cores))
            reasons.append(f"other processes used {share:.0%} of core{'s' if len(interval.cores) > 1 else ''} "
                           f"{cores}")
        self.begin(interval.cores, interval.pids)
        return "; ".join(reasons) or None

    def _others_share_since(self, interval: _Interval) -> float | None:
        if interval.cores is None or interval.core_ticks is None or interval.own_ticks is None:
            return None
        elapsed = self._clock() - interval.started
        if elapsed < MIN_INTERVAL_S:
            return None
        cores_now, own_now = self._core_ticks(interval.cores), self._own_ticks(interval.pids)
        if cores_now is None or own_now is None:
            return None  # e.g. the probe has exited: its ticks are gone
        others = (cores_now - interval.core_ticks) - (own_now - interval.own_ticks)
        capacity = elapsed * self._ticks_per_s * len(interval.cores)
        return max(0.0, others) / capacity


def flagged(point: BatchPoint, reason: str | None) -> BatchPoint:
    """``point`` with ``busy`` set to ``reason`` (only an 'ok' point has timings to flag)."""
    if reason is None or point.status != "ok":
        return point
    document = json.loads(point.to_json())
    document["busy"] = reason
    return BatchPoint.model_validate_json(json.dumps(document))


def merge_remeasured(first: Sequence[BatchPoint], again: Sequence[BatchPoint]) -> list[BatchPoint]:
    """The sweep's points with each busy one replaced by its second measurement when that one was
    not busy, or, when both were, by the faster of the two (less of the other job in it), flagged."""
    retried = {p.batch_size: p for p in again if p.status == "ok"}
    merged = []
    for point in first:
        second = retried.get(point.batch_size)
        if point.busy is None or second is None:
            merged.append(point)
        elif second.busy is None:
            merged.append(second)
        else:
            merged.append(min((point, second), key=lambda p: p.forward_backward.median_s))
    return merged


__all__ = ["BusyMonitor", "MIN_INTERVAL_S", "OTHERS_SHARE", "OtherJob", "asam_tune_jobs", "core_busy_ticks",
           "flagged", "merge_remeasured", "process_ticks"]
