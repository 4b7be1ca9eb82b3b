"""Plots written to PNG files, never shown: a profile's step-time curves and a run's timeline.

matplotlib is an optional extra (``pip install "asam-tune[plot]"``), imported only here and only
when a plot is drawn. Figures are drawn on the Agg canvas directly, without pyplot, so nothing
opens a window or touches a global backend, whatever the environment sets.

- ``plot_profile``: step time (forward+backward + optimizer step) against batch size for every
  device configuration, log-log: the measured medians with their interquartile ranges, and the
  cost model's fitted curve; a plan's b_p and B are marked on the curves they run on.
- ``plot_timeline``: what the main process and the worker did over time, from recorded events
  ``{"kind": "main_step" | "handover" | "wait" | "ascent", "step": int, "start_s": float,
  "end_s": float}`` (seconds on one monotonic clock): the overlap of the worker's ascents with
  the main steps, and where the main step waited.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from asam_tune.errors import UserInputError
from asam_tune.records.plan import Plan
from asam_tune.records.profile import Profile

INSTALL_HINT = 'plots need matplotlib: pip install "asam-tune[plot]"'
EVENT_KINDS = ("main_step", "handover", "wait", "ascent")
_COLOURS = {"main_step": "#1f77b4", "handover": "#ff7f0e", "wait": "#d62728", "ascent": "#2ca02c"}
_LANES = {"main_step": 1, "handover": 1, "wait": 1, "ascent": 0}
# Step numbers are written on the main steps only while they stay legible.
_MAX_LABELLED_STEPS = 30


def require_matplotlib() -> None:
    """Fail now, before minutes of measuring, when the 'plot' extra is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserInputError(INSTALL_HINT) from None


def _figure(width: float, height: float):
    """A figure on the Agg canvas, or a one-line error naming the extra to install."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserInputError(INSTALL_HINT) from None
    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | os.PathLike) -> None:
    from asam_tune.records.base import check_writable

    check_writable(path)
    try:
        figure.savefig(os.fspath(path), format="png")
    except OSError as exc:
        raise UserInputError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None


# ----------------------------------------------------------------------------- profile

def plot_profile(profile: Profile, path: str | os.PathLike, *, plan: Plan | None = None) -> None:
    """Step time against batch size per device configuration (log-log), ``plan``'s b_p and B marked."""
    from asam_tune.costmodel.evaluate import device_models

    if plan is not None and plan.workload.name != profile.workload.name:
        raise UserInputError(f"the plan is for workload {plan.workload.name!r}, the profile for "
                             f"{profile.workload.name!r}")
    models = device_models(profile)
    if not models:
        raise UserInputError("the profile has no successful timing to plot")
    figure = _figure(7.5, 5.0)
    axes = figure.add_subplot()
    largest = max(p.batch_size for d in profile.devices for p in d.ok_points())
    if plan is not None:
        largest = max(largest, plan.batch_size)
    colours = {}
    for index, device in enumerate(d for d in profile.devices if d.config.key in models):
        key, model = device.config.key, models[device.config.key]
        points = device.ok_points()
        batches = [p.batch_size for p in points]
        steps = [1e3 * (p.forward_backward.median_s + p.optimizer_step.median_s) for p in points]
        spreads = [1e3 * p.forward_backward.iqr_s for p in points]
        colour = f"C{index % 10}"
        colours[key] = colour
        ooms = sorted(p.batch_size for p in device.points if p.status == "oom")
        label = key + (f" (out of memory from {ooms[0]})" if ooms else "")
        axes.errorbar(batches, steps, yerr=spreads, fmt="o", color=colour, capsize=2, label=label)
        grid = _log_grid(1, largest)
        axes.plot(grid, [1e3 * model.step_s(b) for b in grid], "-", color=colour, linewidth=0.8, alpha=0.7)
    if plan is not None:
        _mark_plan(axes, plan, models, colours)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("batch size (samples)")
    axes.set_ylabel("step time (ms): forward+backward + optimizer step")
    axes.set_title(f"{profile.workload.name}: measured medians (bars: IQR) and the cost model's fit")
    axes.grid(True, which="both", linewidth=0.3, alpha=0.5)
    axes.legend(fontsize="small")
    _save(figure, path)


def _log_grid(low: int, high: int, count: int = 60) -> list[int]:
    if high <= low:
        return [low]
    step = (math.log(high) - math.log(low)) / (count - 1)
    return sorted({max(1, round(math.exp(math.log(low) + i * step))) for i in range(count)})


def _mark_plan(axes, plan: Plan, models: dict, colours: dict) -> None:
    main, pert = plan.main_device, plan.perturbation.key
    if main in models:
        axes.plot([plan.batch_size], [1e3 * models[main].step_s(plan.batch_size)], "s", markersize=10,
                  markerfacecolor="none", color=colours[main], label=f"plan: B={plan.batch_size} on {main}")
    if plan.mode != "synchronous" and pert in models:
        b_p = plan.perturbation_batch_size
        axes.plot([b_p], [1e3 * models[pert].step_s(b_p)], "*", markersize=14, color=colours[pert],
                  label=f"plan: b_p={b_p} on {pert} ({plan.hiding or ('hidden' if plan.feasible else 'not hidden')})")
        axes.axvline(b_p, color=colours[pert], linestyle=":", linewidth=0.8)
    if plan.quality is not None and plan.quality.min_perturbation_fraction is not None:
        axes.axvline(plan.quality.min_perturbation_batch_size, color="grey", linestyle="--", linewidth=0.8,
                     label=f"quality floor b_p >= {plan.quality.min_perturbation_batch_size}")


# ----------------------------------------------------------------------------- timeline

@dataclass(frozen=True)
class Event:
    kind: str
    step: int
    start_s: float
    end_s: float


def parse_events(events: Iterable[Mapping]) -> list[Event]:
    """Validated events; a bad one is a one-line error naming it."""
    parsed = []
    for index, event in enumerate(events):
        if not isinstance(event, Mapping):
            raise UserInputError(f"timeline event {index} is not a mapping: {event!r}")
        missing = [k for k in ("kind", "step", "start_s", "end_s") if k not in event]
        if missing:
            raise UserInputError(f"timeline event {index} lacks {', '.join(missing)}")
        kind, step, start, end = event["kind"], event["step"], event["start_s"], event["end_s"]
        if kind not in EVENT_KINDS:
            raise UserInputError(f"timeline event {index} has kind {kind!r}; expected one of {', '.join(EVENT_KINDS)}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise UserInputError(f"timeline event {index} has step {step!r}; expected an integer >= 0")
        for name, value in (("start_s", start), ("end_s", end)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserInputError(f"timeline event {index} has {name} {value!r}; expected a finite number")
        if end < start:
            raise UserInputError(f"timeline event {index} ends ({end!r}) before it starts ({start!r})")
        parsed.append(Event(kind, step, float(start), float(end)))
    if not parsed:
        raise UserInputError("no timeline events to plot")
    return parsed


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in _merged(intervals))


def _intersection(first: list[tuple[float, float]], second: list[tuple[float, float]]) -> float:
    total = 0.0
    for a0, a1 in _merged(first):
        for b0, b1 in _merged(second):
            total += max(0.0, min(a1, b1) - max(a0, b0))
    return total


@dataclass(frozen=True)
class TimelineSummary:
    span_s: float  # first start to last end
    main_busy_s: float  # main steps and handovers (merged)
    wait_s: float  # the main step waiting for the worker (merged)
    ascent_s: float  # the worker computing (merged)
    overlap_s: float  # the worker computing while the main step computes


def summarize_timeline(events: Iterable[Mapping]) -> TimelineSummary:
    return _summary(parse_events(events))


def _summary(parsed: list[Event]) -> TimelineSummary:
    by_kind = {kind: [(e.start_s, e.end_s) for e in parsed if e.kind == kind] for kind in EVENT_KINDS}
    main = by_kind["main_step"] + by_kind["handover"]
    return TimelineSummary(
        span_s=max(e.end_s for e in parsed) - min(e.start_s for e in parsed), main_busy_s=_length(main),
        wait_s=_length(by_kind["wait"]), ascent_s=_length(by_kind["ascent"]),
        overlap_s=_intersection(by_kind["ascent"], by_kind["main_step"]))


def plot_timeline(events: Iterable[Mapping], path: str | os.PathLike, *, title: str | None = None) -> TimelineSummary:
    """Main process and worker over time (ms from the first event); returns the summary it captions."""
    parsed = parse_events(events)
    summary = _summary(parsed)
    origin = min(e.start_s for e in parsed)
    figure = _figure(10.0, 3.2)
    axes = figure.add_subplot()
    for kind in EVENT_KINDS:
        bars = [(1e3 * (e.start_s - origin), 1e3 * (e.end_s - e.start_s)) for e in parsed if e.kind == kind]
        if bars:
            lane = _LANES[kind]
            axes.broken_barh(bars, (lane - 0.35, 0.7), facecolors=_COLOURS[kind], edgecolor="black", linewidth=0.3,
                             hatch="//" if kind == "wait" else None, label=kind.replace("_", " "))
    steps = [e for e in parsed if e.kind == "main_step"]
    if len(steps) <= _MAX_LABELLED_STEPS:
        for e in steps:
            axes.text(1e3 * ((e.start_s + e.end_s) / 2 - origin), 1.45, str(e.step), ha="center", va="bottom",
                      fontsize="x-small")
    axes.set_yticks([0, 1], labels=["worker", "main process"])
    axes.set_ylim(-0.6, 1.9)
    axes.set_xlabel("time (ms)")
    busy = summary.overlap_s / summary.ascent_s if summary.ascent_s > 0 else 0.0
    axes.set_title(title or "main steps and worker ascents", fontsize="medium")
    figure.suptitle(f"main step waited {1e3 * summary.wait_s:.3g} ms of {1e3 * summary.span_s:.3g} ms; "
                    f"{busy:.0%} of the worker's ascent time overlapped a main step", fontsize="small")
    axes.legend(loc="upper right", fontsize="x-small", ncol=4)
    axes.grid(True, axis="x", linewidth=0.3, alpha=0.5)
    _save(figure, path)
    return summary


__all__ = ["EVENT_KINDS", "INSTALL_HINT", "TimelineSummary", "parse_events", "plot_profile", "plot_timeline",
           "summarize_timeline"]
