"""Rich tables for profiles, plans and benchmark results (no torch import)."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from asam_tune.profiler.machine_load import busy_summary, end_warning, start_warning
from asam_tune.records.profile import LoadAverages, MachineLoad, Profile

# One legend line under each kind of output: the terms a newcomer meets there.
_KEYS = ("cpu/2t: the CPU computing with 2 threads; cuda:0: the first GPU; 'on 1,2': the CPU cores it "
         "was pinned to")
PROFILE_LEGEND = (f"Legend: {_KEYS}. fwd+bwd: forward and backward pass of one batch; IQR: spread of the "
                  "samples (interquartile range); noisy: IQR above 10% of the median; busy: measured while "
                  "another job used the cores (re-measured where it could be); slowdown: the main step while "
                  "the other device computes, over the main step alone.")
PLAN_LEGEND = (f"Legend: {_KEYS}. b_p: how many samples of the next batch the ascent gradient uses; "
               "staleness 1: the perturbation for step t+1 is computed from step t's weights while step t runs "
               "(the paper's method); staleness 0: synchronous SAM; non-blocking: never wait for the worker; "
               "hidden fraction: 1 = SGD's step time, 0 = SAM's; x SGD: step time over SGD's.")
TRAINING_LEGEND = ("Legend: test acc: accuracy on clean test labels (what counts); train acc: on the noisy "
                   "training labels; step ms: median step time; b_p: samples of the next batch the ascent "
                   "used; staleness k:n: n steps applied a perturbation computed k steps earlier (0: in the "
                   "same step, 1: one step stale, as planned).")
BENCH_LEGEND = ("Legend: x SGD: median step time over SGD's on the main cores; hidden fraction: (SAM - "
                "asynchronous SAM) / (SAM - SGD), 1 = SGD's cost, 0 = SAM's; predicted: the plan's numbers.")
TUNING_LEGEND = ("Legend: b_p: samples of the next batch the ascent gradient uses; hidden: the main step waited "
                 "at most the margin for the worker; Pareto front: the trials no other trial beats on both step "
                 "time and b_p; predicted: the cost model's numbers, measured: the trial's.")

_MODES = {"staleness1": "asynchronous, staleness 1", "non_blocking": "asynchronous, non-blocking",
          "synchronous": "synchronous SAM"}


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _placed(key: str, cores: tuple[int, ...] | None) -> str:
    """A configuration key and the cores it ran on, when recorded: 'cpu/1t on 1' (short: the
    contention table has to fit 80 columns)."""
    return key if cores is None else f"{key} on {','.join(map(str, cores))}"


def mode_text(mode: str, staleness: int) -> str:
    """'asynchronous, staleness 1' rather than the record's 'staleness1 (staleness 1)'."""
    text = _MODES.get(mode, mode)
    if mode == "non_blocking":
        text += f" (staleness {staleness} or more)"
    return text


def _loads(loads: LoadAverages | None) -> str:
    return "unknown" if loads is None else " ".join(f"{x:.2f}" for x in loads)


def load_line(load: MachineLoad | None) -> str:
    """The machine's load while profiling, on one line: start -> end, cores, and whether it was busy."""
    if load is None:
        return "not recorded (a profile written before asam-tune recorded it)"
    line = (f"{_loads(load.start)} -> {_loads(load.end)} (1/5/15-min averages, start -> end) "
            f"on {load.usable_cores} usable core{'s' if load.usable_cores != 1 else ''}")
    if load.end is not None and load.profiler_busy_cores is not None:
        line += f"; about {load.own_share_at_end():.2f} of the end is the profiler's own"
    busy = [moment for moment, warning in (("start", start_warning(load.start, load.usable_cores)),
                                           ("end", end_warning(load))) if warning]
    if busy:
        line += f"; BUSY at the {' and the '.join(busy)}: another job ran, timings may be noisy"
    return line


def profile_tables(profile: Profile) -> list[Table]:
    fp = profile.fingerprint
    wl = profile.workload
    gpus = ", ".join(g.name or f"gpu {g.index}" for g in fp.gpus) or "none"
    header = Table(title="Profile", show_header=False)
    header.add_row("workload", f"{wl.name} ({wl.parameter_count:,} parameters, {wl.dtype}, input {wl.input_shape})")
    header.add_row("cpu", f"{fp.cpu.model or 'unknown'}; usable cores {fp.cpu.usable_cores}")
    header.add_row("gpus", gpus)
    header.add_row("torch", f"{fp.torch_version} (cuda {fp.cuda_version})")
    header.add_row("created", profile.created_at)
    header.add_row("load", load_line(profile.machine_load))
    busy = busy_summary(profile)
    if busy:
        header.add_row("BUSY", busy)
    tables = [header]

    tables.append(_points_table("Forward+backward and optimizer step (medians)",
                                [(entry.config.key, entry.points) for entry in profile.devices]))
    if profile.ascent_dtype is not None:
        tables.append(_points_table(f"The ascent under autocast to {profile.ascent_dtype} (medians, --ascent-dtype)",
                                    [(entry.config.key, entry.ascent_points) for entry in profile.devices
                                     if entry.ascent_points]))

    if profile.transfers:
        tables.append(_table("Transfers (parameters out, perturbation back)",
                             ("from", "to", "MB", "pinned", "out ms", "back ms"),
                             [(t.source, t.target, f"{t.parameter_bytes / 1e6:.2f}", str(t.pinned),
                               _ms(t.to_target.median_s), _ms(t.to_source.median_s)) for t in profile.transfers]))
    if profile.contention:
        contention = _table("Contention (main step while the other device is busy)",
                            ("main", "busy", "batch", "alone ms", "while busy ms", "slowdown"),
                            [(_placed(c.main, c.main_cores), _placed(c.busy, c.busy_cores), str(c.batch_size),
                              _ms(c.main_alone.median_s), _ms(c.main_while_busy.median_s), f"{c.slowdown:.2f}x")
                             for c in profile.contention])
        if any(c.main_cores is not None or c.busy_cores is not None for c in profile.contention):
            contention.caption = "'on': the cores each probe ran on"
        tables.append(contention)
    if profile.handovers:
        tables.append(_table("Handover to a CPU worker process (main process's cost per step)",
                             ("main", "worker", "ms", "IQR ms"),
                             [(h.main, h.perturbation, f"{h.per_step.median_s * 1e3:.3f}",
                               f"{h.per_step.iqr_s * 1e3:.3f}") for h in profile.handovers]))
    return tables


def _points_table(title: str, devices) -> Table:
    """One row per (configuration, batch point) of ``devices``: [(key, points), ...]."""
    points = Table(title=title)
    for column in ("device", "batch", "status", "fwd+bwd ms", "IQR ms", "samples/s", "opt step ms", "noisy/busy"):
        points.add_column(column, justify="right" if column not in ("device", "status") else "left")
    for key, entry_points in devices:
        for point in sorted(entry_points, key=lambda p: p.batch_size):
            fb, opt = point.forward_backward, point.optimizer_step
            rate = f"{point.batch_size / fb.median_s:,.0f}" if fb else "-"
            status = point.status if point.status != "error" else f"error: {point.error}"
            noisy = ", ".join(flag for flag, present in (("noisy", (fb and fb.noisy) or (opt and opt.noisy)),
                                                         ("busy", point.busy is not None)) if present)
            points.add_row(key, str(point.batch_size), status,
                           _ms(fb.median_s if fb else None), _ms(fb.iqr_s if fb else None), rate,
                           _ms(opt.median_s if opt else None), noisy)
    return points


def _table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    return table


def print_tables(tables: list[Table], console: Console | None = None) -> None:
    console = console or Console()
    for table in tables:
        console.print(table)


def _pert_label(perturbation) -> str:
    label = perturbation.key
    if perturbation.cores:
        label += f" on {'core' if len(perturbation.cores) == 1 else 'cores'} {','.join(map(str, perturbation.cores))}"
    return label


def plan_tables(plan) -> list[Table]:
    p = plan.predictions
    choice = Table(title="Plan", show_header=False)
    choice.add_row("workload", f"{plan.workload.name} at batch size {plan.batch_size}")
    choice.add_row("main device", f"{plan.main_device} ({plan.main_cores} core(s) per rank)")
    choice.add_row("perturbation", _pert_label(plan.perturbation))
    choice.add_row("perturbation batch (b_p)", str(plan.perturbation_batch_size))
    choice.add_row("mode", mode_text(plan.mode, plan.staleness))
    if plan.ascent_dtype is not None:
        choice.add_row("ascent dtype", f"{plan.ascent_dtype} (autocast; AsyncSAM uses it from this plan)")
    choice.add_row("hidden", plan.hiding or ("yes" if plan.feasible else "no"))
    if plan.quality is not None:
        choice.add_row("quality floor", _floor(plan))
        choice.add_row("expected gain", f"{_gain(plan.quality.expected_gain)} of SAM's accuracy gain over SGD")
    choice.add_row("rho rule", _rho_rule(plan))
    if plan.profile_load is not None:
        choice.add_row("profile load", plan.profile_load.summary)
    choice.add_row("verdict", plan.verdict)
    tables = [choice]
    if plan.trade is not None:
        tables.append(trade_table(plan))

    compare = Table(title="Predicted step time")
    for column in ("", "ms", "x SGD"):
        compare.add_column(column, justify="left" if not column else "right")
    for name, seconds in (("SGD", p.sgd_step_s), ("SAM", p.sam_step_s), ("asynchronous SAM", p.asam_step_s)):
        compare.add_row(name, _ms(seconds), f"{seconds / p.sgd_step_s:.2f}")
    compare.caption = (f"hidden fraction {p.hidden_fraction:.2f}, speed-up over SAM {p.speedup_over_sam:.2f}x; "
                       f"perturbation {_ms(p.perturbation_time_s)} ms (transfers {_ms(p.transfer_time_s)} ms, "
                       f"{p.transfer}), contention x{p.contention_slowdown:.2f} ({p.contention})")
    tables.append(compare)

    if plan.alternatives:
        others = Table(title="Alternatives")
        for column in ("main", "perturbation", "b_p", "mode", "hidden", "asam ms", "x SGD"):
            others.add_column(column)
        for alt in plan.alternatives:
            ap = alt.predictions
            others.add_row(alt.main_device, _pert_label(alt.perturbation), str(alt.perturbation_batch_size),
                           mode_text(alt.mode, alt.staleness), "yes" if alt.feasible else "no", _ms(ap.asam_step_s),
                           f"{ap.asam_step_s / ap.sgd_step_s:.2f}")
        tables.append(others)
    if plan.notes:
        notes = Table(title="Notes", show_header=False)
        for note in plan.notes:
            notes.add_row(note)
        tables.append(notes)
    return tables


def _gain(gain) -> str:
    if gain.value is None:
        return "unknown"
    return f"{'at most ' if gain.bound == 'at_most' else ''}{gain.value:.0%}"


def _floor(plan) -> str:
    q = plan.quality
    if q.min_perturbation_fraction is None:
        return "none (hide fully, whatever b_p)"
    return f"b_p >= {q.min_perturbation_batch_size} of {plan.batch_size} ({q.min_perturbation_fraction:.0%} of B)"


def _rho_rule(plan) -> str:
    rule = plan.rho_rule
    if rule.kind == "none":
        return "none: rho is the same at every b_p"
    factor = rule.factor(plan.perturbation_batch_size, plan.batch_size)
    return (f"rho x min({rule.max_factor:g}, (B/b_p)^{rule.exponent:g}): x{factor:.2f} at b_p="
            f"{plan.perturbation_batch_size}")


def trade_table(plan) -> Table:
    """The plan that hides the ascent (no floor), the one that keeps the gain, synchronous SAM and
    SGD, in one table; '>' marks the plan's choice."""
    p, trade = plan.predictions, plan.trade
    table = Table(title="Hiding the ascent or keeping SAM's gain")
    for column in ("plan", "b_p", "hiding", "ms/step", "x SGD", "x SAM", "gain"):
        table.add_column(column, justify="left" if column in ("plan", "hiding") else "right")
    options = [("hides" if trade.hides_fully is None or trade.hides_fully.hiding == "stale" else "hides fully",
                "hides_fully", trade.hides_fully), ("keeps the gain", "keeps_gain", trade.keeps_gain)]
    for label, kind, option in options:
        if option is None:
            continue
        mark = "> " if trade.chosen == kind else "  "
        table.add_row(f"{mark}{label}: {option.main_device} + {option.perturbation}", str(option.perturbation_batch_size),
                      option.hiding if option.hiding != "stale" else f"stale {option.staleness}",
                      _ms(option.asam_step_s), f"{option.asam_step_s / p.sgd_step_s:.2f}",
                      f"{option.asam_step_s / p.sam_step_s:.2f}", _gain(option.expected_gain))
    mark = "> " if trade.chosen == "synchronous" else "  "
    table.add_row(f"{mark}synchronous SAM", str(plan.batch_size), "none", _ms(p.sam_step_s),
                  f"{p.sam_step_s / p.sgd_step_s:.2f}", "1.00", "100%")
    table.add_row("  SGD", "-", "-", _ms(p.sgd_step_s), "1.00", f"{p.sgd_step_s / p.sam_step_s:.2f}", "0%")
    table.caption = (f"gain: expected share of SAM's accuracy gain over SGD; hiding: full, partial (the main step "
                     f"waits), stale N (non-blocking, N steps old). Chosen (>): {trade.reason}")
    return table


def training_table(results: list[dict], *, label_noise: float | None = None) -> Table:
    noise = "" if label_noise is None else f", {label_noise:.0%} of training labels flipped"
    table = Table(title=f"MNIST-1D training{noise}")
    for column in ("optimizer", "test acc %", "train acc %", "time s", "step ms", "b_p", "staleness"):
        table.add_column(column, justify="left" if column == "optimizer" else "right")
    for r in results:
        worker = r.get("worker") or {}
        staleness = ", ".join(f"{k}:{v}" for k, v in (worker.get("staleness_histogram") or {}).items())
        table.add_row(r["method"], f"{100 * r['test_accuracy']:.1f}", f"{100 * r['train_accuracy']:.1f}",
                      f"{r['train_time_s']:.1f}", _ms(r["step_time_median_s"]),
                      str(r["perturbation_batch_size"] or "-"),
                      staleness or "-")
    return table


def _first_load(load: dict | None) -> str:
    if not load:
        return "not recorded"
    return " -> ".join("?" if loads is None else f"{loads[0]:.2f}" for loads in (load["start"], load["end"]))


def bench_table(result: dict) -> Table:
    placement = result["placement"]
    table = Table(title=f"{result['workload']} at batch {result['batch_size']}: median step time "
                        f"({result['steps']} steps)")
    for column in ("", "ms", "x SGD", "predicted ms"):
        table.add_column(column, justify="left" if not column else "right")
    sgd = result["sgd"]["step_time_median_s"]
    predicted = result.get("predicted", {})
    on_cpu = "sgd_all_cores" in result
    rows = [("SGD", "sgd", None if on_cpu else "sgd_step_s"), ("SAM", "sam", None if on_cpu else "sam_step_s"),
            ("asynchronous SAM", "asam", "asam_step_s")]
    if on_cpu:
        rows[:0] = [(f"SGD on all {result['sgd_all_cores']['threads']} cores", "sgd_all_cores", "sgd_step_s"),
                    (f"SAM on all {result['sam_all_cores']['threads']} cores", "sam_all_cores", "sam_step_s")]
    for label, key, predicted_key in rows:
        seconds = result[key]["step_time_median_s"]
        table.add_row(label, _ms(seconds), f"{seconds / sgd:.2f}",
                      _ms(predicted.get(predicted_key)) if predicted_key else "")
    hidden = result.get("hidden_fraction")
    table.caption = (f"main {placement['main_device']} on cores {placement['main_cores']}, perturbation "
                     f"{placement['perturbation']} b_p={placement['perturbation_batch_size']}; hidden fraction "
                     f"{'-' if hidden is None else f'{hidden:.2f}'}; worker {_ms(result['asam']['worker_compute_median_s'])}"
                     f" ms/job, main waited {_ms(result['asam']['wait_median_s'])} ms/step; 1-minute load "
                     f"average {_first_load(result.get('load_average'))}")
    return table
