"""The rho study as markdown and as a plot (best-rho factor against B / b_p, log-log, with the fits)."""
from __future__ import annotations

from pathlib import Path


def _f(value, fmt: str = ".3g") -> str:
    return "-" if value is None else format(value, fmt)


def _mean_sd(mean, sd) -> str:
    return "-" if mean is None else f"{100 * mean:.1f} ± {100 * sd:.1f}"


def _fraction(value: float) -> str:
    from fractions import Fraction

    return str(Fraction(value).limit_denominator(128))


def markdown(study: dict) -> str:
    rule = study["rule"]
    cap = "no cap" if rule["max_factor"] is None else f"capped at {rule['max_factor']:.2f}"
    lines = [
        "## Rho against b_p", "",
        f"Machine: {study['machine']['cpu']}; {study['date']}; commit {study['commit']}. Inputs: "
        + ", ".join(f"`{p}`" for p in study["inputs"]) + ".", "",
        "Best rho on the validation split (the ladder value chosen), divided by SAM's; beside it the vertex of "
        "the parabola through the best value and its neighbours in log rho, divided by SAM's vertex:", "",
        "| workload | method | b_p/B | b_p | best rho | factor vs SAM | vertex rho | vertex factor "
        "| at the edge of the tried range |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in study["points"]:
        lines.append(f"| {p['workload']} | `{p['method']}` | {_fraction(p['fraction'])} | {p['b_p']} | "
                     f"{_f(p['best_rho'])} | {_f(p['factor'])} | {_f(p['vertex_rho'])} | {_f(p['vertex_factor'])} | "
                     f"{'yes (not fitted)' if p['at_edge'] else 'no'} |")
    lines += ["", "Fits in log rho (rmse in log rho; 0.1 is a factor of about 1.1; explained: 1 - (rmse / rmse of "
              "no rule)^2):", "", "| data | power with cap: a, cap | rmse | explained | power, no cap: a | rmse "
              "| no rule: rmse |", "|---|---|---|---|---|---|---|"]
    for name, f in study["fits"].items():
        if "error" in f:
            lines.append(f"| {name} | {f['error']} | | | | | |")
            continue
        pc, p = f["power_with_cap"], f["power"]
        cap_text = "none" if pc["max_factor"] is None else f"{pc['max_factor']:.2f}"
        lines.append(f"| {name} ({f['points_used']} points) | {pc['exponent']:.3f}, {cap_text} | "
                     f"{pc['rmse_log']:.3f} | {_f(pc['explained'], '.2f')} | {p['exponent']:.3f} | {p['rmse_log']:.3f} | "
                     f"{f['none']['rmse_log']:.3f} |")
    lines += ["", f"The rule (pooled): rho(b_p) = rho_SAM x (B / b_p)^{rule['exponent']:.3f}, {cap}.", ""]
    for check in study.get("checks", []):
        lines += [f"### {check['workload']}: asynchronous SAM at the rule's rho (test split)", "",
                  f"SGD {100 * check['sgd_test_mean']:.1f} %, SAM {100 * check['sam_test_mean']:.1f} % "
                  f"(rho {check['sam_rho']:g}).", "",
                  "| method | b_p | rule's rho | test % (mean ± sd) | gain | own best rho | test % at own rho | gain |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in check["rows"]:
            lines.append(f"| `{r['method']}` | {r['b_p']} | {r['rule_rho']:g} | {100 * r['test_mean']:.1f} ± "
                         f"{100 * r['test_sd']:.1f} | {r['gain_fraction']:.2f} | {_f(r['own_rho'], 'g')} | "
                         f"{_mean_sd(r['own_test_mean'], r['own_test_sd'])} | "
                         f"{_f(r['own_gain_fraction'], '.2f')} |")
        floor = check["floor_fraction"]
        text = "none" if floor is None else _fraction(floor)
        if floor is not None and floor == check.get("smallest_measured_fraction"):
            text += " (the smallest fraction measured: the floor lies at or below it)"
        if floor is not None and not check.get("floor_unbroken", True):
            text += "; some larger fraction falls short (see the rows)"
        lines += ["", f"Quality floor (smallest b_p/B whose gain at the rule's rho is >= "
                  f"{1 - study['floor_tolerance']:.0%}): {text}.", ""]
    if study.get("checks"):
        floor = study.get("floor_fraction")
        lines.append(f"Floor for the planner (the larger of the workloads'): "
                     f"{'none' if floor is None else _fraction(floor)}.")
    if study.get("gain_table"):
        workloads = list(study["gain_table"][0]["by_workload"])
        lines += ["", "Gain at the rule's rho for the planner (`costmodel/quality.py`: the smaller of the workloads'):",
                  "", "| b_p/B | gain (min) | " + " | ".join(workloads) + " |",
                  "|---|---|" + "---|" * len(workloads)]
        for g in study["gain_table"]:
            lines.append(f"| {_fraction(g['fraction'])} | {g['gain']:.2f} | "
                         + " | ".join(f"{g['by_workload'][w]:.2f}" for w in workloads) + " |")
    if study.get("plot"):
        lines += ["", f"![best rho against b_p]({study['plot']})"]
    return "\n".join(lines) + "\n"


def plot(study: dict, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4.8))
    markers = {}
    for p in study["points"]:
        marker = markers.setdefault(p["workload"], "os^D"[len(markers) % 4])
        axis.scatter(1 / p["fraction"], p["factor"], marker=marker, facecolors="none" if p["at_edge"] else None,
                     color="tab:blue" if marker == "o" else "tab:orange",
                     label=p["workload"] + (" (edge)" if p["at_edge"] else ""))
    xs = [1 + i * 0.25 for i in range(0, 160)]
    for name, style in (("pooled", "-"),):
        f = study["fits"][name]["power_with_cap"]
        ys = [min(f["max_factor"] or float("inf"), x ** f["exponent"]) for x in xs]
        axis.plot(xs, ys, style, color="black", label=f"rule: (B/b_p)^{f['exponent']:.2f}"
                  + ("" if f["max_factor"] is None else f", cap {f['max_factor']:.2f}"))
    axis.axhline(1, color="grey", linestyle=":", linewidth=0.8, label="no rule")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log", base=2)
    axis.set_xlabel("B / b_p")
    axis.set_ylabel("best rho / SAM's best rho (validation)")
    axis.set_title("How far rho must grow as the ascent batch shrinks")
    handles, labels = axis.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axis.legend(unique.values(), unique.keys(), fontsize=8)
    axis.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path).name


__all__ = ["markdown", "plot"]
