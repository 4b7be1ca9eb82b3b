"""The peers plots, written to PNG files (the Agg backend: never a window).

- accuracy against wall-clock: each method's mean test-accuracy curve against its training time
  on this machine at the step time of the timing pass (asynchronous methods with a real worker
  process; the accuracy runs' own times where a method was not timed), and against the
  modelled cost of the worker-budget model;
- accuracy against b_p / B: asynchronous SAM at its own best rho (mean ± sd), synchronous SAM
  with a small ascent batch, with SGD and SAM drawn as bands (mean ± sd).
"""
from __future__ import annotations

from pathlib import Path

from asam_tune.bench.peers_summary import timed_step


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _elapsed(row: dict, steps_per_epoch: int) -> list[float]:
    timed = row.get("worker_timing") or {}
    if timed:  # one sitting for every method: comparable, unlike the accuracy runs spread over hours
        per_epoch = [timed_step(timed) * steps_per_epoch] * len(row["test_curve_mean"])
    else:
        per_epoch = row["epoch_time_mean_s"]
    total, out = 0.0, []
    for t in per_epoch:
        total += t
        out.append(total)
    return out


def plot_accuracy_vs_time(result: dict, path: Path) -> None:
    plt = _pyplot()
    spe = result["steps_per_epoch"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2))
    cmap = plt.get_cmap("tab20")
    for i, (name, row) in enumerate(result["methods"].items()):
        colour = {"sgd": "black", "sam": "tab:green"}.get(row["kind"], cmap(i % 20))
        style = {"color": colour, "linewidth": 2.4 if row["kind"] in ("sgd", "sam") else 1.2,
                 "linestyle": "--" if row["asynchronous"] else "-"}
        curve = [100 * a for a in row["test_curve_mean"]]
        left.plot(_elapsed(row, spe), curve, label=name, **style)
        cost = row.get("budget_cost")
        if cost is not None:
            right.plot([cost * spe * (e + 1) for e in range(len(curve))], curve, label=name, **style)
    sgd = result.get("sgd_test_mean")
    for axis in (left, right):
        if sgd is not None:
            axis.axhline(100 * sgd, color="grey", linewidth=0.8, linestyle=":")
        axis.set_ylabel("test accuracy % (mean over seeds)")
        axis.grid(alpha=0.3)
    left.set_xlabel("training wall-clock s on this machine, timing-pass steps (dashed: with a worker process)")
    right.set_xscale("log")
    right.set_xlabel(f"modelled cost in SGD steps (worker processes beta={result['beta']} of the batch per step)")
    left.set_title(f"{result['task']}: accuracy against wall-clock")
    right.set_title("against the worker-budget model's cost")
    right.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_vs_bp(result: dict, path: Path, extra: dict | None = None) -> None:
    """``extra``: optional {label: [(fraction, mean, sd), ...]} series (e.g. the rule's rho)."""
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(7.5, 5))
    rows = result["methods"]
    for name, colour in (("sgd", "tab:red"), ("sam", "tab:green")):
        if name in rows:
            m, s = 100 * rows[name]["test_mean"], 100 * rows[name]["test_sd"]
            label = f"{name.upper()} (rho {rows[name]['rho']})" if rows[name]["rho"] else name.upper()
            axis.axhspan(m - s, m + s, color=colour, alpha=0.2, label=label)
            axis.axhline(m, color=colour, linewidth=1)
    for kind, marker, colour, label in (("asam", "o", "tab:blue", "asynchronous SAM, own best rho"),
                                        ("sync", "s", "tab:orange", "synchronous SAM, small ascent batch"),
                                        ("split", "D", "tab:purple", "split ascent (worker + main)")):
        points = sorted((r["ascent_fraction"], 100 * r["test_mean"], 100 * r["test_sd"], r["rho"])
                        for r in rows.values() if r["kind"] == kind)
        if points:
            xs, ys, es, rhos = zip(*points)
            axis.errorbar(xs, ys, yerr=es, marker=marker, color=colour, capsize=3, label=label,
                          linestyle="-" if kind == "asam" else "none")
            for x, y, rho in zip(xs, ys, rhos):
                axis.annotate(f"{rho:g}", (x, y), textcoords="offset points", xytext=(4, -11), fontsize=7,
                              color=colour)
    for label, series in (extra or {}).items():
        xs, ys, es = zip(*sorted(series))
        axis.errorbar(xs, [100 * y for y in ys], yerr=[100 * e for e in es], marker="^", capsize=3,
                      label=label, linestyle=":")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("b_p / B (share of the batch the ascent gradient uses)")
    axis.set_ylabel("test accuracy % (mean ± sd over seeds)")
    axis.set_title(f"{result['task']}: accuracy against the ascent batch (labels: rho)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(result: dict, directory: Path) -> dict[str, str]:
    directory = Path(directory)
    files = {"accuracy against wall-clock": "accuracy-vs-time.png", "accuracy against b_p/B": "accuracy-vs-bp.png"}
    plot_accuracy_vs_time(result, directory / files["accuracy against wall-clock"])
    plot_accuracy_vs_bp(result, directory / files["accuracy against b_p/B"])
    return files


__all__ = ["write_plots", "plot_accuracy_vs_time", "plot_accuracy_vs_bp"]
