"""Which use of a small worker budget keeps most of SAM's gain, ranked; and the issue's targets.

    python -m asam_tune.bench.peers_remedies --input DIR1/peers.json --input DIR2/peers.json \\
        --rho RHO_DIR/rho.json --beta 1/32 --output DIR

The worker processes ``beta * B`` samples per main step (``beta = 1/32``: a GPU main step ~30x
faster than one CPU core). Every candidate's accuracy is measured (test split, each at its own
rho chosen on the validation split; the rule's rows at the rule's rho); its cost per step is
modelled (``peers_cost.budget_cost``, in SGD steps) because this machine has no GPU:

- the rule: asynchronous SAM at the b_p the budget hides, rho from the rule;
- partial hiding: a larger b_p, the step waiting for the worker (cost b_p / (beta B));
- the same GPU's second stream: the ascent on the main device beside the descent; a saturated
  device gains nothing from overlap, so it costs 1 + phi * b_p / B, with asynchronous SAM's
  accuracy at that b_p;
- the split: the worker's hidden share plus a few fresh samples on the main device;
- synchronous SAM with a small ascent batch on the main device;
- non-blocking mode at the full batch (the worker's result 32-63 steps stale);
- MESA, RST and LookSAM, which need no worker.

Targets (for a main device 30x faster than one CPU core, ``--target-beta 1/30``): the
configuration a planner picks with the rule and the floor reaches SGD + 0.9 (SAM - SGD) at a
cost below SAM's, and at equal accuracy it costs less than LookSAM.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from fractions import Fraction
from pathlib import Path

from asam_tune.arguments import exit_code_of
from asam_tune.bench.peers_cost import budget_cost, hidden_samples
from asam_tune.bench.peers_methods import parse_method
from asam_tune.errors import UserInputError

GAIN_TARGET = 0.9


def _row(label: str, family: str, accuracy: float, sd: float, gain: float | None, cost: float | None, note: str = "") -> dict:
    return {"candidate": label, "family": family, "test_mean": accuracy, "test_sd": sd, "gain_fraction": gain,
            "cost": cost, "note": note}


def candidates(result: dict, check: dict | None, beta: Fraction) -> list[dict]:
    B, phi = result["batch_size"], result["forward_backward_share"]
    rows = result["methods"]
    # What the worker finishes within one main step (cost 1.0 in the budget model); the
    # planner's 5 % margin is left to the planner.
    hidden = math.floor(float(beta) * B + 1e-9)
    out = []
    for name, r in rows.items():
        method = parse_method(name)
        cost = budget_cost(method, B, beta, phi)
        gain, b_p = r.get("gain_fraction"), r["perturbation_batch_size"]
        if method.kind == "asam":
            family = "rule-sized b_p (own best rho)" if b_p <= hidden else "partial hiding"
            out.append(_row(f"{name}, rho {r['rho']:g}", family, r["test_mean"], r["test_sd"], gain, cost,
                            f"b_p={b_p}, worker {b_p / (float(beta) * B):.2f} main steps per job"))
            if b_p > hidden:
                stream = 1 + phi * b_p / B
                out.append(_row(f"second stream, b_p={b_p}, rho {r['rho']:g}", "same-GPU second stream",
                                r["test_mean"], r["test_sd"], gain, stream,
                                "accuracy of asynchronous SAM at this b_p; cost modelled"))
        elif method.kind in ("sgd", "sam", "po-sam"):
            out.append(_row(name, "baseline", r["test_mean"], r["test_sd"], gain, cost))
        else:
            family = {"sync": "small synchronous ascent", "split": "split ascent", "nonblocking": "non-blocking",
                      "mesa": "one backward (MESA)", "rst": "randomized SAM (RST)", "looksam": "LookSAM"}[method.kind]
            label = name if r["rho"] is None else f"{name}, {'lambda' if method.kind == 'mesa' else 'rho'} {r['rho']:g}"
            out.append(_row(label, family, r["test_mean"], r["test_sd"], gain, cost,
                            f"ascent on {round(B * r['ascent_fraction'])} samples" if method.kind in ("sync", "split") else ""))
    for c in (check or {}).get("rows", []):
        if c["b_p"] <= hidden:
            out.append(_row(f"{c['method']}, rule's rho {c['rule_rho']:g}", "rule (b_p the budget hides, rule's rho)",
                            c["test_mean"], c["test_sd"], c["gain_fraction"], 1.0, f"b_p={c['b_p']}"))
    return rank(out)


def rank(rows: list[dict]) -> list[dict]:
    """Those keeping >= GAIN_TARGET of the gain by cost, then the rest by gain; Pareto flags."""
    for r in rows:
        r["keeps_gain"] = r["gain_fraction"] is not None and r["gain_fraction"] >= GAIN_TARGET
        r["pareto"] = r["cost"] is not None and r["gain_fraction"] is not None and not any(
            o is not r and o["cost"] is not None and o["gain_fraction"] is not None and o["cost"] <= r["cost"]
            and o["gain_fraction"] >= r["gain_fraction"] and (o["cost"], o["gain_fraction"]) != (r["cost"], r["gain_fraction"])
            for o in rows)
    keep = sorted((r for r in rows if r["keeps_gain"]), key=lambda r: (r["cost"] or math.inf, -r["gain_fraction"]))
    rest = sorted((r for r in rows if not r["keeps_gain"]), key=lambda r: -(r["gain_fraction"] or -math.inf))
    return keep + rest


def _time_to(curve: list[float], target: float, cost_per_epoch: float) -> float | None:
    for epoch, value in enumerate(curve, 1):
        if value >= target - 1e-12:
            return epoch * cost_per_epoch
    return None


def _step_ratio(row: dict, sgd: dict) -> float:
    """The method's step over SGD's, from the timing pass (one sitting) when it ran."""
    from asam_tune.bench.peers_summary import timed_step

    if row.get("worker_timing") and sgd.get("worker_timing"):
        return timed_step(row["worker_timing"]) / timed_step(sgd["worker_timing"])
    return row["step_time_median_s"] / sgd["step_time_median_s"]


def targets(result: dict, check: dict | None, target_beta: Fraction, floor: float | None) -> dict:
    """The planner's configuration for a main device 1/target_beta times one core, against the targets."""
    B, phi, spe = result["batch_size"], result["forward_backward_share"], result["steps_per_epoch"]
    rows = result["methods"]
    hidden = hidden_samples(B, target_beta)
    # The floor as the b_p it was measured at (b_p/B = 1/32 of 100 ran with 3 samples).
    floor_b_p = next((c["b_p"] for c in (check or {}).get("rows", []) if floor is not None and c["fraction"] == floor),
                     math.ceil((floor or 0) * B - 1e-9))
    b_p = max(hidden, floor_b_p)
    cost = max(1.0, b_p / (float(target_beta) * B))
    sgd, sam = result["sgd_test_mean"], result["sam_test_mean"]
    threshold = sgd + GAIN_TARGET * (sam - sgd)
    chosen = next((c for c in (check or {}).get("rows", []) if c["b_p"] == b_p), None)
    out = {"target_beta": str(target_beta), "hidden_b_p": hidden, "floor_fraction": floor, "chosen_b_p": b_p,
           "modelled_cost": cost, "sam_cost": 1 + phi, "threshold": threshold, "measured": chosen is not None}
    if chosen is None:
        out["verdict"] = (f"not measured: no asynchronous SAM run at the rule's rho with b_p={b_p}; "
                          "add the fraction to the peers methods and rerun peers_rho")
        return out
    out.update(rule_rho=chosen["rule_rho"], test_mean=chosen["test_mean"], test_sd=chosen["test_sd"],
               gain_fraction=chosen["gain_fraction"], reaches=chosen["test_mean"] >= threshold,
               cheaper_than_sam=cost < 1 + phi)
    looksam = {}
    curve_async = None
    for name, r in rows.items():
        if r["kind"] == "asam" and r["perturbation_batch_size"] == b_p:
            curve_async = r["test_curve_mean"]
    for name, r in rows.items():
        if r["kind"] != "looksam":
            continue
        level = min(r["test_mean"], chosen["test_mean"])
        # Both sides in the same units: LookSAM's step modelled like asynchronous SAM's (on the
        # GPU main this stands for, LookSAM runs there too); its step measured here beside it
        # (a CPU core, and noisy on a shared machine).
        modelled = budget_cost(parse_method(name), B, target_beta, phi)
        step_ratio = _step_ratio(r, rows["sgd"])
        mine = _time_to(curve_async, level, spe * cost) if curve_async else None
        theirs = _time_to(r["test_curve_mean"], level, spe * modelled)
        theirs_measured = _time_to(r["test_curve_mean"], level, spe * step_ratio)
        looksam[name] = {"level": level, "looksam_modelled_step_ratio": modelled,
                         "looksam_measured_step_ratio": step_ratio,
                         "looksam_sgd_steps_to_level": theirs, "looksam_sgd_steps_to_level_measured": theirs_measured,
                         "async_sgd_steps_to_level": mine,
                         "cheaper": mine is not None and (theirs is None or mine < theirs),
                         "cheaper_than_measured": mine is not None and (theirs_measured is None or mine < theirs_measured)}
    out["looksam"] = looksam
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asam_tune.bench.peers_remedies",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--input", action="append", required=True, help="a peers.json (repeat per workload)")
    parser.add_argument("--rho", required=True, help="rho.json from python -m asam_tune.bench.peers_rho")
    parser.add_argument("--beta", default="1/32", help="the worker's share of the batch per main step")
    parser.add_argument("--target-beta", default="1/30", help="the 30x profile of the targets")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    return exit_code_of(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from asam_tune.bench.peers_remedies_report import markdown
    from asam_tune.bench.provenance import emit_result, provenance

    try:
        beta, target_beta = Fraction(args.beta), Fraction(args.target_beta)
    except (ValueError, ZeroDivisionError):
        raise UserInputError(f"--beta and --target-beta must be fractions such as 1/32, got "
                             f"{args.beta!r}, {args.target_beta!r}") from None
    try:
        results = [json.loads(Path(p).read_text()) for p in args.input]
        study = json.loads(Path(args.rho).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserInputError(f"cannot read an input: {exc}") from None
    checks = {c["workload"]: c for c in study.get("checks", [])}
    report = {**provenance(), "beta": str(beta), "gain_target": GAIN_TARGET, "inputs": args.input,
              "rho_study": args.rho, "rule": study["rule"], "floor_fraction": study.get("floor_fraction"),
              "workloads": {}}
    for r in results:
        check = checks.get(r["task"])
        report["workloads"][r["task"]] = {
            "sgd_test_mean": r["sgd_test_mean"], "sam_test_mean": r["sam_test_mean"],
            "forward_backward_share": r["forward_backward_share"],
            "ranking": candidates(r, check, beta),
            "targets": targets(r, check, target_beta, study.get("floor_fraction"))}
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "remedies.md").write_text(markdown(report))
    return emit_result(report, str(output / "remedies.json"), markdown(report))


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["candidates", "rank", "targets", "main", "GAIN_TARGET"]
