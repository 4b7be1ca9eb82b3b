"""Plots are PNG files (never windows), a missing matplotlib is a one-line error naming the extra,
and the timeline's summary is computed by hand."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from asam_tune import plots
from asam_tune.costmodel import make_plan
from asam_tune.errors import UserInputError
from asam_tune.records import Profile, load_record
from tests.fixtures.costmodel_profiles import affine, gpu_with_cpu, profile

PNG = b"\x89PNG\r\n\x1a\n"
PROFILES = Path(__file__).resolve().parents[2] / "profiles"


def _png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 1000


def _events(steps: int = 4, main: float = 0.010, ascent: float = 0.015, handover: float = 0.001) -> list[dict]:
    """Partially hidden, by hand: each step is a handover, then the main step (10 ms) beside the
    worker's ascent (15 ms), then the wait for the ascent's end (5 ms)."""
    events, t = [], 0.0
    for step in range(steps):
        events.append({"kind": "handover", "step": step, "start_s": t, "end_s": t + handover})
        start = t + handover
        events.append({"kind": "main_step", "step": step, "start_s": start, "end_s": start + main})
        events.append({"kind": "ascent", "step": step + 1, "start_s": start, "end_s": start + ascent})
        if ascent > main:
            events.append({"kind": "wait", "step": step, "start_s": start + main, "end_s": start + ascent})
        t = start + max(main, ascent)
    return events


def test_profile_plot_with_and_without_a_plan(tmp_path):
    machine = load_record(Profile, PROFILES / "synthetic-gpu30x-resnet20.json")
    plots.plot_profile(machine, tmp_path / "curves.png")
    _png(tmp_path / "curves.png")
    plan = make_plan(machine, 128, min_perturbation_fraction=0.06)
    plots.plot_profile(machine, tmp_path / "marked.png", plan=plan)
    _png(tmp_path / "marked.png")


def test_profile_plot_with_an_oom_point_and_a_plan_for_another_workload(tmp_path):
    machine = profile(affine("cuda:0", 0.01, 0.0001, oom_from=512), affine("cpu/4t", 0.002, 0.001))
    plots.plot_profile(machine, tmp_path / "oom.png", plan=make_plan(machine, 100))
    _png(tmp_path / "oom.png")
    other = make_plan(machine, 100).model_copy(update={"workload": machine.workload.model_copy(
        update={"name": "resnet20"})})
    with pytest.raises(UserInputError, match="plan is for workload 'resnet20'"):
        plots.plot_profile(machine, tmp_path / "x.png", plan=other)


def test_timeline_plot_and_its_summary_by_hand(tmp_path):
    summary = plots.plot_timeline(_events(), tmp_path / "timeline.png", title="by hand")
    _png(tmp_path / "timeline.png")
    # 4 steps of 1 + 15 ms: span 64 ms; main busy 4 x 11 ms; waits 4 x 5 ms; ascents 4 x 15 ms, of
    # which 10 ms overlap each main step.
    assert summary.span_s == pytest.approx(0.064)
    assert summary.main_busy_s == pytest.approx(0.044)
    assert summary.wait_s == pytest.approx(0.020)
    assert summary.ascent_s == pytest.approx(0.060)
    assert summary.overlap_s == pytest.approx(0.040)
    hidden = plots.summarize_timeline(_events(ascent=0.008))
    assert hidden.wait_s == 0.0 and hidden.overlap_s == pytest.approx(4 * 0.008)


@pytest.mark.parametrize("events, message", [
    ([], "no timeline events"),
    ([{"kind": "sleep", "step": 0, "start_s": 0.0, "end_s": 1.0}], "kind 'sleep'"),
    ([{"kind": "wait", "step": 0, "start_s": 1.0, "end_s": 0.5}], "ends (0.5) before it starts (1.0)"),
    ([{"kind": "wait", "step": -1, "start_s": 0.0, "end_s": 0.5}], "step -1"),
    ([{"kind": "wait", "step": 0, "start_s": float("nan"), "end_s": 0.5}], "start_s nan"),
    ([{"kind": "wait", "step": 0, "start_s": 0.0}], "lacks end_s"),
    (["wait"], "is not a mapping"),
])
def test_bad_events_are_one_line_errors(tmp_path, events, message):
    with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plots.plot_timeline(events, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_without_matplotlib_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(UserInputError) as caught:
        plots.plot_timeline(_events(), tmp_path / "x.png")
    assert str(caught.value) == 'plots need matplotlib: pip install "asam-tune[plot]"'


def test_plotting_opens_no_window_whatever_backend_the_environment_asks_for(tmp_path):
    """A GUI backend in MPLBACKEND (absent here: it would fail to start) changes nothing: the
    figure is drawn on the Agg canvas and pyplot is never imported."""
    code = ("import sys; from asam_tune import plots; from tests.fixtures.costmodel_profiles import gpu_with_cpu; "
            f"plots.plot_profile(gpu_with_cpu(), {str(tmp_path / 'p.png')!r}); "
            "print('pyplot' if 'matplotlib.pyplot' in sys.modules else 'no pyplot')")
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120,
                            env={**os.environ, "MPLBACKEND": "TkAgg", "DISPLAY": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no pyplot"
    _png(tmp_path / "p.png")


def test_an_unwritable_plot_is_a_one_line_error(tmp_path):
    with pytest.raises(UserInputError, match="is a directory"):
        plots.plot_profile(gpu_with_cpu(), tmp_path)
