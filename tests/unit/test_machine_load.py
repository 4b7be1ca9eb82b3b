"""The machine's load while profiling: readings, the busy-machine warnings, how they are shown.

Every source (load averages, clock, CPU time) is injected: no busy machine is needed.
"""
from __future__ import annotations

import io
import os
import sys

import pytest
from rich.console import Console

from asam_tune.cli import render
from asam_tune.profiler.machine_load import (BUSY_LOAD_PER_CORE, LoadWatch, end_warning, read_load_average,
                                             start_warning)
from asam_tune.profiler.run import ProgressUpdate, _Progress
from tests.record_factories import machine_load, small_profile, with_machine_load


class Clock:
    """A clock and a CPU-time counter the test moves by hand."""

    def __init__(self):
        self.now = 100.0
        self.cpu = 5.0

    def __call__(self) -> float:
        return self.now

    def cpu_seconds(self) -> float:
        return self.cpu


def readings(*values):
    """A load source that answers ``values`` one after the other."""
    queue = list(values)
    return lambda: queue.pop(0)


def test_the_threshold_is_half_a_task_per_usable_core():
    assert BUSY_LOAD_PER_CORE == 0.5
    assert start_warning((1.0, 0.0, 0.0), 2) is None  # exactly at the threshold: not busy
    assert start_warning((1.01, 0.0, 0.0), 2) is not None
    assert start_warning((3.9, 4.0, 4.0), 8) is None  # a 1-minute figure only: 5 and 15 do not count
    assert start_warning((0.6, 0.0, 0.0), 1) is not None


def test_the_start_warning_is_one_line_naming_the_load_and_the_cores():
    message = start_warning((1.8, 1.2, 0.9), 2)
    assert message == ("the 1-minute load average is 1.80 on 2 usable cores: another job is running, "
                       "timings will be noisy (the profile records the load)")
    assert "1 usable core:" in start_warning((0.9, 0, 0), 1)


def test_no_load_average_no_warning():
    assert start_warning(None, 2) is None
    assert end_warning(machine_load(start=None, end=None)) is None


def test_the_end_warning_leaves_out_the_profilers_own_share():
    # 1.8 cores busy for 60 s: about 1.14 of the end's 1-minute figure is the profiler's own.
    own_only = machine_load(end=(1.9, 1.0, 0.5), elapsed_s=60.0, busy_cores=1.8)
    assert own_only.own_share_at_end() == pytest.approx(1.14, abs=0.01)
    assert end_warning(own_only) is None
    another_job = machine_load(end=(2.3, 1.0, 0.5), elapsed_s=60.0, busy_cores=1.8)
    message = end_warning(another_job)
    assert message.startswith("at the end of profiling the 1-minute load average is 2.30 on 2 usable cores, "
                              "about 1.14 of it the profiler's own: another job ran during profiling")
    assert message.endswith("(the profile records the load)") and "\n" not in message


def test_the_watch_records_start_end_elapsed_time_and_the_profilers_busy_cores():
    clock = Clock()
    watch = LoadWatch(2, readings((0.123456, 0.2, 0.3), (1.3, 0.5, 0.35)), clock=clock,
                      cpu_seconds=clock.cpu_seconds)
    assert watch.start == (0.12, 0.2, 0.3)  # the kernel's two decimals
    assert watch.start_warning() is None
    clock.now += 20.0
    clock.cpu += 30.0  # 1.5 cores busy on average
    load = watch.finish()
    assert (load.start, load.end, load.usable_cores) == ((0.12, 0.2, 0.3), (1.3, 0.5, 0.35), 2)
    assert (load.elapsed_s, load.profiler_busy_cores) == (20.0, 1.5)
    # 1.5 x (1 - e^(-20/60)) = 0.43 of the 1.3 is the profiler's own: 0.87 left, not busy.
    assert end_warning(load) is None


def test_the_watch_warns_at_the_start_and_at_the_end_of_a_busy_run():
    clock = Clock()
    watch = LoadWatch(2, readings((1.8, 1.0, 0.7), (2.4, 1.4, 0.8)), clock=clock, cpu_seconds=clock.cpu_seconds)
    assert "1-minute load average is 1.80 on 2 usable cores" in watch.start_warning()
    clock.now += 12.0
    clock.cpu += 12.0
    assert "load average is 2.40" in end_warning(watch.finish())


def test_a_job_that_starts_during_profiling_is_warned_about_at_the_end_only():
    clock = Clock()
    watch = LoadWatch(2, readings((0.1, 0.1, 0.1), (1.6, 0.6, 0.3)), clock=clock, cpu_seconds=clock.cpu_seconds)
    assert watch.start_warning() is None
    clock.now += 30.0
    clock.cpu += 30.0
    assert end_warning(watch.finish()) is not None


def test_a_system_without_load_averages_records_none(monkeypatch):
    monkeypatch.delattr(os, "getloadavg")
    assert read_load_average() is None
    watch = LoadWatch(4)  # the default source
    load = watch.finish()
    assert (load.start, load.end, load.usable_cores) == (None, None, 4)
    assert watch.start_warning() is None and end_warning(load) is None


def test_unobtainable_load_averages_are_none(monkeypatch):
    def unobtainable():
        raise OSError("Load averages are unobtainable")

    monkeypatch.setattr(os, "getloadavg", unobtainable)
    assert read_load_average() is None


@pytest.mark.skipif(not hasattr(os, "getloadavg"), reason="no load averages on this system")
def test_the_real_load_average_is_three_non_negative_figures():
    loads = read_load_average()
    assert len(loads) == 3 and all(x >= 0 for x in loads)


def test_warnings_go_through_the_progress_callback_marked_as_warnings():
    updates: list[ProgressUpdate] = []
    tracker = _Progress(updates.append, total=3)
    tracker.say("cpu/1t: starting its probe process")
    tracker.warn(None)  # nothing to warn about: nothing reported
    tracker.warn(start_warning((1.8, 1.0, 1.0), 2))
    assert [u.warning for u in updates] == [False, True]
    assert str(updates[1]).startswith("the 1-minute load average is 1.80")
    _Progress(None, total=1).warn("no callback: nothing happens")


def test_the_cli_prints_a_warning_as_one_line_on_stderr(capsys):
    from asam_tune.cli.commands import warnings_only as _warnings_only

    message = start_warning((1.8, 1.2, 0.9), 2)
    _warnings_only(ProgressUpdate("cpu/1t: batch 8 ok", 1, 3))
    _warnings_only(ProgressUpdate(message, 1, 3, warning=True))
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"asam-tune: warning: {message}\n"  # one line, however wide


def _shown(profile) -> str:
    out = io.StringIO()
    render.print_tables(render.profile_tables(profile), Console(file=out, width=250))
    return out.getvalue()


def test_show_prints_the_load_and_the_contention_cores():
    text = _shown(with_machine_load(small_profile()))
    assert ("0.20 0.30 0.40 -> 0.60 0.40 0.40 (1/5/15-min averages, start -> end) on 2 usable cores; "
            "about 0.22 of the end is the profiler's own") in text
    assert "BUSY" not in text
    assert "cpu/1t on 0" in text and "cpu/1t on 1" in text


def test_show_marks_a_busy_machine_and_says_when_nothing_was_recorded():
    busy = with_machine_load(small_profile(), machine_load(start=(1.8, 1.0, 0.7), end=(0.5, 0.9, 0.7)))
    assert "BUSY at the start: another job ran" in _shown(busy)
    both = with_machine_load(small_profile(), machine_load(start=(1.8, 1.0, 0.7), end=(2.5, 1.2, 0.8)))
    assert "BUSY at the start and the end" in _shown(both)
    unknown = with_machine_load(small_profile(), machine_load(start=None, end=None))
    assert "unknown -> unknown" in _shown(unknown)
    assert "│ load     │ not recorded (a profile written before asam-tune recorded it)" in _shown(small_profile())


def test_rendering_a_profile_imports_no_torch():
    import subprocess

    code = "import sys; import asam_tune.cli.render; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
