"""Accuracy benchmark: MNIST-1D with noisy labels, SGD vs SAM vs asynchronous SAM, 3 seeds.

Also the ablation whose ascent batch is the previous one ("asam-previous"). Run:

    python -m asam_tune.bench.accuracy --plan runs/plan.json --output docs/accuracy.json

and it prints a markdown table (mean and spread per method) stamped with machine, date and
commit. Every run uses the same epochs, learning-rate schedule and label noise.
"""
from __future__ import annotations

import argparse
import statistics
import sys

from asam_tune import arguments as types
from asam_tune.bench.provenance import emit_result, provenance
from asam_tune.bench.training import METHODS, TrainConfig, train_mnist1d
from asam_tune.errors import UserInputError
from asam_tune.records import Plan


def run_accuracy_bench(*, plan: Plan | None, seeds=(0, 1, 2), methods=METHODS, epochs: int = 60,
                       label_noise: float = 0.3, rho: float = 0.3, lr: float = 0.05,
                       batch_size: int = 100, log=print) -> dict:
    runs = []
    for method in methods:
        for seed in seeds:
            config = TrainConfig(method=method, epochs=epochs, batch_size=batch_size, lr=lr, rho=rho,
                                 seed=seed, label_noise=label_noise)
            run = train_mnist1d(config, plan=plan if method.startswith("asam") else None)
            log(f"{method:14s} seed {seed}: test {100 * run['test_accuracy']:.1f}%  "
                f"({run['train_time_s']:.0f} s)")
            runs.append(run)
    summary = {}
    for method in methods:
        accuracies = [100 * r["test_accuracy"] for r in runs if r["method"] == method]
        summary[method] = {"mean": statistics.mean(accuracies),
                           "stdev": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                           "runs": accuracies}
    return {**provenance(), "task": f"MNIST-1D, {label_noise:.0%} training labels flipped",
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "rho": rho, "seeds": list(seeds),
            "perturbation_batch_size": plan.perturbation_batch_size if plan is not None else batch_size,
            "summary": summary, "runs": runs}


def markdown(result: dict) -> str:
    lines = [f"{result['task']}; {result['epochs']} epochs, batch {result['batch_size']}, lr {result['lr']} "
             f"(cosine), rho {result['rho']}, asynchronous b_p = {result['perturbation_batch_size']}; "
             f"seeds {result['seeds']}. Machine: {result['machine']['cpu']}, "
             f"{result['machine']['usable_cores']} cores; {result['date']}; commit {result['commit']}.", "",
             "| method | test accuracy % (mean ± sd) | runs |", "|---|---|---|"]
    for method, s in result["summary"].items():
        runs = ", ".join(f"{a:.1f}" for a in s["runs"])
        lines.append(f"| {method} | {s['mean']:.1f} ± {s['stdev']:.1f} | {runs} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", default=None, metavar="PLAN",
                        help="plan for asynchronous SAM (default: no worker process, the ascent in-process)")
    parser.add_argument("--epochs", type=types.positive_int, default=60, metavar="N", help="epochs (default 60)")
    parser.add_argument("--seeds", type=types.positive_int, default=3, metavar="S",
                        help="seeds 0..S-1 per method (default 3)")
    parser.add_argument("--rho", type=types.non_negative_float, default=0.3, help="SAM's radius (default 0.3)")
    parser.add_argument("--lr", type=types.positive_float, default=0.05,
                        help="base SGD's learning rate, cosine-annealed (default 0.05)")
    parser.add_argument("--label-noise", type=types.fraction, default=0.3, metavar="FRACTION",
                        help="share of training labels flipped (default 0.3)")
    parser.add_argument("--methods", type=types.csv, default=METHODS, metavar="LIST",
                        help=f"comma-separated, from {','.join(METHODS)} (default: all)")
    parser.add_argument("--output", default=None, metavar="JSON", help="write the full result as JSON here")


def run(args: argparse.Namespace) -> int:
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise UserInputError(f"unknown --methods {','.join(unknown)} (choose from {','.join(METHODS)})")
    plan = None
    if args.plan:
        from asam_tune import api

        plan = api.load_plan(args.plan)
        api.check_machine(plan, allow_other_machine=True)
    result = run_accuracy_bench(plan=plan, seeds=tuple(range(args.seeds)), methods=args.methods,
                                epochs=args.epochs, label_noise=args.label_noise, rho=args.rho, lr=args.lr,
                                batch_size=plan.batch_size if plan else 100,
                                log=lambda line: print(line, file=sys.stderr, flush=True))
    return emit_result(result, args.output, markdown(result))


def main(argv=None) -> int:
    return types.script_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
