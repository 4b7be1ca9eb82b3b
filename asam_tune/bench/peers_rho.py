"""How the best rho follows b_p: measured on the validation split, fitted, and checked on the test split.

    python -m asam_tune.bench.peers_rho --input DIR1/peers.json --input DIR2/peers.json --output DIR

1. Points. For every asynchronous SAM fraction ``b_p/B`` of every input, the best rho on the
   validation split -- the ladder value the selection chose -- divided by SAM's own (the
   full-batch rho the user gives). Also, as a check on the ladder's coarseness, the vertex of
   the parabola through the best value and its neighbours in log rho (``best_rho_estimate``;
   pulled low where accuracy falls off a cliff just above the best rho). A best value at an end
   of the tried range is kept but flagged and left out of the fits.
2. Fits, in log rho: ``factor = min(cap, (B/b_p)^a)`` (the runtime's ``RhoRule`` "power") by a
   grid search over ``a`` and ``cap``; the same without a cap; and ``factor = 1`` (no rule),
   each with its root-mean-square error in log rho, on each workload alone and on both pooled.
3. Check. Asynchronous SAM at the pooled rule's rho on every seed of the inputs (new runs, in
   each input's run store), test accuracy beside that at the method's own best rho; the gain
   fraction ``(acc - SGD) / (SAM - SGD)`` of each; and the quality floor: the smallest measured
   ``b_p/B`` whose gain at the rule's rho is at least ``1 - FLOOR_TOLERANCE`` (and whether every
   larger measured fraction keeps it too). When the smallest measured fraction keeps the gain,
   the floor is only known to lie at or below it.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from fractions import Fraction
import sys
from pathlib import Path

from asam_tune.arguments import exit_code_of
from asam_tune.errors import UserInputError

FLOOR_TOLERANCE = 0.10


def points_of(result: dict) -> list[dict]:
    """(fraction, best-rho factor) per asynchronous SAM method of one peers result."""
    from asam_tune.bench.peers_select import best_rho_estimate

    selections = result["selections"]
    if "sam" not in selections:
        raise UserInputError(f"{result['task']}: the peers result has no SAM selection to normalise by")
    sam = best_rho_estimate({float(r): s for r, s in selections["sam"]["val_scores"].items()})
    out = []
    for name, row in result["methods"].items():
        if row["kind"] != "asam" or name not in selections:
            continue
        estimate = best_rho_estimate({float(r): s for r, s in selections[name]["val_scores"].items()})
        chosen = selections[name]["rho"]
        out.append({"workload": result["task"], "method": name, "fraction": row["ascent_fraction"],
                    "b_p": row["perturbation_batch_size"], "best_rho": chosen, "vertex_rho": estimate["rho"],
                    "at_edge": estimate["at_edge"], "sam_rho": selections["sam"]["rho"],
                    "factor": chosen / selections["sam"]["rho"], "vertex_factor": estimate["rho"] / sam["rho"]})
    return sorted(out, key=lambda p: -p["fraction"])


def _rule_factor(inverse_fraction: float, exponent: float, cap: float | None) -> float:
    factor = inverse_fraction ** exponent
    return factor if cap is None else min(cap, factor)


def _rmse(points: list[dict], exponent: float, cap: float | None, key: str = "factor") -> float:
    errors = [math.log(p[key]) - math.log(_rule_factor(1 / p["fraction"], exponent, cap)) for p in points]
    return math.sqrt(statistics.mean(e * e for e in errors))


def fit(points: list[dict], key: str = "factor") -> dict:
    """The power law with and without a cap, and no rule, fitted to ``key`` in log rho (grid search)."""
    usable = [p for p in points if not p["at_edge"]]
    if len(usable) < 2:
        raise UserInputError(f"only {len(usable)} usable best-rho points: cannot fit a rule")
    exponents = [i / 400 for i in range(0, 401)]  # 0 .. 1
    largest = max(p[key] for p in usable)
    caps = [None] + [1 + i * (max(largest, 1.0) * 1.5 - 1) / 200 for i in range(1, 201)]
    best_power = min(((a, c) for a in exponents for c in caps), key=lambda ac: _rmse(usable, *ac, key))
    uncapped = min(exponents, key=lambda a: _rmse(usable, a, None, key))
    none_rmse = _rmse(usable, 0.0, None, key)
    power_rmse = _rmse(usable, *best_power, key)

    def explained(rmse: float) -> float | None:
        return None if none_rmse == 0 else 1 - (rmse / none_rmse) ** 2

    return {
        "points_used": len(usable), "points_at_edge": len(points) - len(usable),
        "power_with_cap": {"exponent": best_power[0], "max_factor": best_power[1], "rmse_log": power_rmse,
                           "explained": explained(power_rmse)},
        "power": {"exponent": uncapped, "rmse_log": _rmse(usable, uncapped, None, key),
                  "explained": explained(_rmse(usable, uncapped, None, key))},
        "none": {"rmse_log": none_rmse},
        "fitted": key,
        "residuals": [{"workload": p["workload"], "fraction": p["fraction"], "measured_factor": p[key],
                       "rule_factor": _rule_factor(1 / p["fraction"], *best_power)} for p in usable],
    }


def rule_rho(rule: dict, sam_rho: float, fraction: float) -> float:
    """The rule's rho for ``fraction``, rounded to 3 significant digits (runs are keyed by it)."""
    value = sam_rho * _rule_factor(1 / fraction, rule["exponent"], rule["max_factor"]) if fraction < 1 else sam_rho
    return float(f"{value:.3g}")


def check_rule(result: dict, rule: dict, *, progress, extra_fractions: tuple[str, ...] = (),
               only_fractions: tuple[str, ...] = ()) -> dict:
    """Train asynchronous SAM at the rule's rho on every seed; gains and the quality floor.

    ``extra_fractions`` (e.g. "1/100") are checked too, below what the peers result measured;
    ``only_fractions``, when given, limits the check to those of the measured fractions."""
    from asam_tune.bench.peers_methods import parse_method
    from asam_tune.bench.peers_tasks import load_task
    from asam_tune.bench.peers_train import RunStore, get_or_train

    task = load_task(result["task"])
    store = RunStore(result["run_store"])
    sam_rho = result["methods"]["sam"]["rho"]
    sgd, sam = result["sgd_test_mean"], result["sam_test_mean"]
    rows = []
    measured = {name: row for name, row in result["methods"].items() if row["kind"] == "asam"}
    if only_fractions:
        wanted = {Fraction(f) for f in only_fractions}
        measured = {name: row for name, row in measured.items()
                    if Fraction(row["ascent_fraction"]).limit_denominator(1000) in wanted}
    names = list(measured) + [f"asam-{f}" for f in extra_fractions if f"asam-{f}" not in measured]
    for name in names:
        method = parse_method(name)
        row = measured.get(name, {"ascent_fraction": float(method.ascent_fraction()), "rho": None,
                                  "perturbation_batch_size": method.perturbation_batch_size(task.batch_size),
                                  "test_mean": None, "test_sd": None})
        rho = rule_rho(rule, sam_rho, row["ascent_fraction"])
        runs = [get_or_train(store, task, method, rho, seed, result["epochs"], progress=progress)
                for seed in range(result["seeds"])]
        tests = [r["test_accuracy"] for r in runs]
        mean = statistics.mean(tests)
        rows.append({"method": name, "fraction": row["ascent_fraction"], "b_p": row["perturbation_batch_size"],
                     "rule_rho": rho, "test_accuracy": tests, "test_mean": mean,
                     "test_sd": statistics.stdev(tests) if len(tests) > 1 else 0.0,
                     "gain_fraction": (mean - sgd) / (sam - sgd),
                     "own_rho": row["rho"], "own_test_mean": row["test_mean"], "own_test_sd": row["test_sd"],
                     "own_gain_fraction": row.get("gain_fraction")})
    rows.sort(key=lambda r: -r["fraction"])
    keeps = [r["fraction"] for r in rows if r["gain_fraction"] >= 1 - FLOOR_TOLERANCE]
    floor = min(keeps) if keeps else None
    # Whether every measured fraction above the floor keeps the gain too (noise can break the run).
    unbroken = floor is not None and all(r["gain_fraction"] >= 1 - FLOOR_TOLERANCE
                                         for r in rows if r["fraction"] >= floor)
    return {"workload": result["task"], "sam_rho": sam_rho, "sgd_test_mean": sgd, "sam_test_mean": sam,
            "rows": rows, "floor_fraction": floor, "floor_unbroken": unbroken,
            "smallest_measured_fraction": min(r["fraction"] for r in rows) if rows else None}


def gain_table(checks: list[dict]) -> list[dict]:
    """Per b_p/B measured on every workload: the smallest gain at the rule's rho among the
    workloads (what ``costmodel/quality.py``'s table for the power rule takes), and each one's."""
    if not checks:
        return []
    common = set.intersection(*({r["fraction"] for r in c["rows"]} for c in checks))
    out = []
    for fraction in sorted(common, reverse=True):
        by = {c["workload"]: next(r["gain_fraction"] for r in c["rows"] if r["fraction"] == fraction) for c in checks}
        out.append({"fraction": fraction, "gain": min(by.values()), "by_workload": by})
    return out


def extra_for(text: str, workload: str) -> tuple[str, ...]:
    """The extra fractions of ``--extra-fractions`` that apply to ``workload``."""
    out = []
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        name, _, fraction = entry.rpartition(":")
        if not name or name == workload:
            out.append(fraction)
    return tuple(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asam_tune.bench.peers_rho", description=__doc__.splitlines()[0])
    parser.add_argument("--input", action="append", required=True, help="a peers.json (repeat for each workload)")
    parser.add_argument("--output", required=True, help="directory for rho.json, rho.md and rho-vs-bp.png")
    parser.add_argument("--no-check", action="store_true", help="fit only: train nothing at the rule's rho")
    parser.add_argument("--extra-fractions", default="",
                        help="b_p/B values below the peers' to check too, e.g. 1/50,1/100; "
                             "WORKLOAD:F checks F on that workload only")
    parser.add_argument("--check-fractions", default="",
                        help="check only these of the measured b_p/B (same form as --extra-fractions; default: all)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    return exit_code_of(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    import torch

    from asam_tune.bench.peers_rho_report import markdown, plot
    from asam_tune.bench.provenance import emit_result, provenance

    threads = torch.get_num_threads()
    results = []
    for path in args.input:
        try:
            results.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserInputError(f"cannot read the peers result {path}: {exc}") from None
    points = [p for r in results for p in points_of(r)]
    fits = {"pooled": fit(points), "pooled, parabola vertices": fit(points, key="vertex_factor")}
    for r in results:
        mine = [p for p in points if p["workload"] == r["task"]]
        try:
            fits[r["task"]] = fit(mine)
        except UserInputError as exc:
            fits[r["task"]] = {"error": str(exc)}
    rule = fits["pooled"]["power_with_cap"]
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    torch.set_num_threads(1)
    try:
        checks = [] if args.no_check else [
            check_rule(r, rule, progress=progress, extra_fractions=extra_for(args.extra_fractions, r["task"]),
                       only_fractions=extra_for(args.check_fractions, r["task"]))
            for r in results]
    finally:
        torch.set_num_threads(threads)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    study = {**provenance(), "inputs": args.input, "points": points, "fits": fits,
             "rule": {"kind": "power", "exponent": rule["exponent"], "max_factor": rule["max_factor"],
                      "source": f"peers_rho on {', '.join(r['task'] for r in results)} "
                                f"(validation split), pooled fit"},
             "checks": checks, "floor_tolerance": FLOOR_TOLERANCE}
    study["gain_table"] = gain_table(checks)
    floors = [c["floor_fraction"] for c in checks if c["floor_fraction"] is not None]
    study["floor_fraction"] = max(floors) if len(floors) == len(checks) and floors else None
    if not args.no_plots:
        study["plot"] = plot(study, output / "rho-vs-bp.png")
    (output / "rho.md").write_text(markdown(study))
    return emit_result(study, str(output / "rho.json"), markdown(study))


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["points_of", "fit", "rule_rho", "check_rule", "gain_table", "main", "FLOOR_TOLERANCE"]
