"""How busy the machine was while it was profiled, and a warning when another job shares it.

Timings taken beside another job are slower and noisier, steadily enough not to look noisy
(docs/profile-format.md: up to 30x for a configuration that needs every core), and nothing in
the timings says so. So the profile records the load averages when measuring starts and ends,
and the profiler warns when the 1-minute one is above ``BUSY_LOAD_PER_CORE`` x the usable cores.

At the end the load average includes the profiler's own probes (on a machine with few cores a
long profile alone can pass the threshold), so the end check first subtracts their estimated share:
the cores they kept busy on average (CPU time of this process and its waited-for children over
the elapsed time), times the part of the last minute that measuring covered.

No torch import: this runs in the parent process, which must stay light.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable

from asam_tune.records.profile import LoadAverages, MachineLoad, Profile

# A 1-minute load average above this many runnable tasks per usable core means another job
# competes for the cores. Below 1 on purpose: on 2 cores one busy core already changes timings.
BUSY_LOAD_PER_CORE = 0.5

LoadSource = Callable[[], "tuple[float, float, float] | None"]


def read_load_average() -> LoadAverages | None:
    """``os.getloadavg()`` to the kernel's two decimals; None where the system has none."""
    try:
        loads = os.getloadavg()
    except (AttributeError, OSError):  # Windows has no getloadavg; some systems cannot tell
        return None
    return _rounded(loads)


def _rounded(loads) -> LoadAverages:
    return tuple(round(float(x), 2) for x in loads)  # type: ignore[return-value]


def profiler_cpu_seconds() -> float:
    """CPU time of this process and its finished children (the probes, once closed)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _cores(n: int) -> str:
    return f"{n} usable core{'s' if n != 1 else ''}"


def _is_busy(other_load: float, usable_cores: int) -> bool:
    return other_load > BUSY_LOAD_PER_CORE * usable_cores


def start_warning(start: LoadAverages | None, usable_cores: int) -> str | None:
    """The warning for a busy machine when measuring starts, or None."""
    if start is None or not _is_busy(start[0], usable_cores):
        return None
    return (f"the 1-minute load average is {start[0]:.2f} on {_cores(usable_cores)}: another job is running, "
            "timings will be noisy (the profile records the load)")


def end_warning(load: MachineLoad) -> str | None:
    """The warning for a busy machine when measuring ends (the profiler's own share left out), or None."""
    if load.end is None:
        return None
    own = load.own_share_at_end()
    if not _is_busy(load.end[0] - own, load.usable_cores):
        return None
    return (f"at the end of profiling the 1-minute load average is {load.end[0]:.2f} on "
            f"{_cores(load.usable_cores)}, about {own:.2f} of it the profiler's own: another job ran during "
            "profiling, timings may be noisy (the profile records the load)")


def busy_summary(profile: Profile) -> str | None:
    """One sentence on why the profile's numbers may be inflated by another job: a busy load
    average at the start or the end, points flagged busy; None when nothing says so. What a plan
    made from the profile should carry, and what ``show`` prints."""
    reasons = []
    load = profile.machine_load
    if load is not None:
        if start_warning(load.start, load.usable_cores):
            reasons.append(f"1-minute load average {load.start[0]:.2f} on {_cores(load.usable_cores)} at the start")
        if end_warning(load):
            reasons.append(f"{load.end[0]:.2f} at the end, about {load.own_share_at_end():.2f} of it the profiler's")
    flagged = profile.busy_points()
    if flagged:
        total = sum(1 for d in profile.devices for p in d.points if p.status == "ok")
        keys = ", ".join(dict.fromkeys(key for key, _ in flagged))
        reasons.append(f"{len(flagged)} of {total} points measured while another job used their cores ({keys})")
    if not reasons:
        return None
    return "measured on a busy machine: " + "; ".join(reasons)


class LoadWatch:
    """Takes the start readings when made; ``finish`` takes the end ones and gives the record.

    Every source is injectable, so the checks are tested without a busy machine.
    """

    def __init__(self, usable_cores: int, read: LoadSource | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 cpu_seconds: Callable[[], float] = profiler_cpu_seconds):
        self.usable_cores = usable_cores
        self._read = read or read_load_average
        self._clock = clock
        self._cpu_seconds = cpu_seconds
        self.start = self._reading()
        self._started_at = clock()
        self._cpu_at_start = cpu_seconds()

    def _reading(self) -> LoadAverages | None:
        loads = self._read()
        return None if loads is None else _rounded(loads)

    def start_warning(self) -> str | None:
        return start_warning(self.start, self.usable_cores)

    def finish(self) -> MachineLoad:
        end = self._reading()
        elapsed = max(0.0, self._clock() - self._started_at)
        cpu = max(0.0, self._cpu_seconds() - self._cpu_at_start)
        return MachineLoad(start=self.start, end=end, usable_cores=self.usable_cores, elapsed_s=round(elapsed, 2),
                           profiler_busy_cores=round(cpu / elapsed, 2) if elapsed > 0 else None)


__all__ = ["BUSY_LOAD_PER_CORE", "LoadWatch", "busy_summary", "read_load_average", "profiler_cpu_seconds", "start_warning",
           "end_warning"]
