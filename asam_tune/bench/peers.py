"""SAM's peers side by side: every method at its own best rho, same data, model, optimizer and seeds.

    python -m asam_tune.bench.peers --workload mnist1d-cnn --epochs 60 --seeds 3 --output DIR

For each method (``peers_methods`` names them) rho is chosen on the validation split by a short
walk on a ladder (``peers_select``), with the sweep seeds; then the method trains with the
chosen rho on every seed and its test accuracy is reported (runs of the sweep seeds at the
chosen rho are reused: they were trained exactly so). Every run is kept in ``DIR/runs.jsonl``
(or ``--cache``): an interrupted invocation resumes where it stopped.

Per method: test accuracy per seed and mean ± sd; validation accuracy at the chosen rho; the
step and epoch times of the accuracy runs (in-process: serial for the asynchronous methods);
the step time with a real worker process (``peers_timing``); the cost model's predicted step
(a shipped profile); the modelled cost when the worker processes ``beta`` of the batch per main
step (``peers_cost``); time to SGD's final test accuracy. Writes DIR/peers.json, DIR/peers.md,
DIR/accuracy-vs-time.png and DIR/accuracy-vs-bp.png, stamped with machine, date, commit and
load average.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from fractions import Fraction
from pathlib import Path

from asam_tune.arguments import exit_code_of
from asam_tune.bench.peers_methods import NEEDS_EXTRA, Method, parse_method
from asam_tune.bench.peers_tasks import TASKS, Task, load_task
from asam_tune.errors import UserInputError

DEFAULT_METHODS = (
    "sgd", "sam", "po-sam", "looksam-k5", "looksam-k10",
    "asam-1", "asam-1/2", "asam-1/4", "asam-1/8", "asam-1/16", "asam-1/32",
    "sync-1/16", "nonblocking-1-beta1/32", "split-1/32+1/8", "mesa", "rst-0.5",
)
QUICK_METHODS = ("sgd", "sam", "po-sam", "asam-1/4")
# Where the walk for a smaller ascent batch starts: SAM's rho times (B / b)^GUESS_EXPONENT.
GUESS_EXPONENT = 0.2


def check_extras(methods: list[Method], plots: bool) -> None:
    """One line naming what to install when an optional dependency is missing."""
    from asam_tune.bench.peers_steppers import missing_extra

    if any(m.kind in NEEDS_EXTRA for m in methods):
        try:
            import pytorch_optimizer  # noqa: F401
        except ImportError:
            raise UserInputError(missing_extra("pytorch_optimizer", "peers")) from None
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserInputError(missing_extra("matplotlib", "plot")) from None


def _guess(task: Task, method: Method, sam_rho: float | None) -> float:
    if method.kind == "mesa":
        return 1.0
    base = sam_rho if sam_rho is not None else task.rho_guess
    fraction = method.ascent_fraction()
    if method.kind in ("asam", "sync", "split") and 0 < fraction < 1:
        return base * float(1 / fraction) ** GUESS_EXPONENT
    return base


def select_rho(store, task: Task, method: Method, *, epochs: int, sweep_seeds: list[int],
               grid: list[float] | None, sam_rho: float | None, progress) -> dict:
    """The method's rho by validation accuracy (mean over the sweep seeds)."""
    from asam_tune.bench.peers_select import LADDERS, best_rho_estimate, walk
    from asam_tune.bench.peers_train import get_or_train

    by_seed: dict[float, list[float]] = {}

    def score(rho: float) -> float:
        runs = [get_or_train(store, task, method, rho, seed, epochs, progress=progress) for seed in sweep_seeds]
        by_seed[rho] = [r["val_accuracy"] for r in runs]
        return sum(by_seed[rho]) / len(by_seed[rho])

    if grid:
        scores = {rho: score(rho) for rho in sorted(grid)}
        chosen = max(scores, key=scores.get)
    else:
        ladder = LADDERS["mesa" if method.kind == "mesa" else task.ladder]
        chosen, scores = walk(ladder, _guess(task, method, sam_rho), score)
    return {"rho": chosen, "val_scores": {str(r): s for r, s in scores.items()},
            "val_by_seed": {str(r): v for r, v in sorted(by_seed.items())},
            "estimate": best_rho_estimate(scores)}


def run_peers(task: Task, methods: list[Method], *, epochs: int, seeds: int, sweep_seeds: int,
              grid: list[float] | None, store, beta: Fraction, timing_steps: int, progress,
              rule_sweep_seeds: int | None = None) -> dict:
    """``rule_sweep_seeds``: sweep seeds for SAM and asynchronous SAM, whose best rho the rho
    study fits (default: ``sweep_seeds``)."""
    from asam_tune.bench.peers_summary import summarize
    from asam_tune.bench.peers_train import get_or_train

    selections: dict[str, dict] = {}
    runs: dict[str, list[dict]] = {}
    ordered = sorted(methods, key=lambda m: (m.kind != "sgd", m.kind != "sam"))
    sam_rho = None
    for method in ordered:
        if method.has_rho:
            count = rule_sweep_seeds if rule_sweep_seeds and method.kind in ("sam", "asam") else sweep_seeds
            selection = select_rho(store, task, method, epochs=epochs, sweep_seeds=list(range(count)),
                                   grid=grid, sam_rho=sam_rho, progress=progress)
            selections[method.name] = selection
            rho = selection["rho"]
            if method.kind == "sam":
                sam_rho = rho
        else:
            rho = 0.0
        runs[method.name] = [get_or_train(store, task, method, rho, seed, epochs, progress=progress)
                             for seed in range(seeds)]
    timing = None
    if timing_steps:
        from asam_tune.bench.peers_timing import time_with_worker

        timed = [m.name for m in methods if m.kind != "split"]
        chosen = {name: s["rho"] for name, s in selections.items()}
        timing = time_with_worker(task, timed, chosen, steps=timing_steps, progress=progress)
    return summarize(task, methods, runs, selections, timing, beta=beta, epochs=epochs)


def _fraction_arg(text: str) -> Fraction:
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a fraction such as 1/32, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def _grid_arg(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    from asam_tune import arguments as types

    parser = argparse.ArgumentParser(prog="python -m asam_tune.bench.peers", description=__doc__.splitlines()[0])
    parser.add_argument("--workload", required=True, choices=sorted(TASKS))
    parser.add_argument("--epochs", type=types.positive_int, default=None, help="default: the workload's")
    parser.add_argument("--seeds", type=types.positive_int, default=3, help="seeds per method for test accuracy")
    parser.add_argument("--sweep-seeds", type=types.positive_int, default=1,
                        help="seeds per rho value in the validation sweep (the first ones of --seeds)")
    parser.add_argument("--rule-sweep-seeds", type=types.positive_int, default=None,
                        help="sweep seeds for sam and asam-* (the rho study fits them; default --sweep-seeds)")
    parser.add_argument("--methods", type=types.csv, default=None, help=f"default: {','.join(DEFAULT_METHODS)}")
    parser.add_argument("--rho-grid", type=_grid_arg, default=None,
                        help="try exactly these rho values for every method (default: a walk on a ladder)")
    parser.add_argument("--beta", type=_fraction_arg, default=Fraction(1, 32),
                        help="the worker's share of the batch per main step in the cost model (default 1/32)")
    parser.add_argument("--timing-steps", type=types.non_negative_int, default=150,
                        help="steps per method timed with a real worker process (0: skip)")
    parser.add_argument("--output", required=True, help="directory for peers.json, peers.md and the plots")
    parser.add_argument("--cache", default=None, help="run store (default: OUTPUT/runs.jsonl)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 epoch, 1 seed, rho 0.1, a few methods, 10 timed steps")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return exit_code_of(lambda: _run(args, argv))


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    import torch

    from asam_tune.bench.peers_plots import write_plots
    from asam_tune.bench.peers_report import markdown
    from asam_tune.bench.peers_train import RunStore
    from asam_tune.bench.provenance import emit_result, provenance

    task = load_task(args.workload)
    names = args.methods or (QUICK_METHODS if args.quick else DEFAULT_METHODS)
    methods = [parse_method(n) for n in names]
    if len({m.name for m in methods}) != len(methods):
        raise UserInputError(f"--methods lists a method twice: {','.join(names)}")
    check_extras(methods, plots=not args.no_plots)
    epochs = 1 if args.quick else (args.epochs or task.epochs)
    seeds = 1 if args.quick else args.seeds
    sweep_seeds = min(args.sweep_seeds, seeds)
    rule_sweep_seeds = min(args.rule_sweep_seeds or sweep_seeds, seeds)
    grid = [0.1] if args.quick and args.rho_grid is None else args.rho_grid
    timing_steps = min(args.timing_steps, 10) if args.quick else args.timing_steps
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    store = RunStore(args.cache or output / "runs.jsonl")
    started_load = list(os.getloadavg())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the runs are timed on one core
    try:
        result = run_peers(task, methods, epochs=epochs, seeds=seeds, sweep_seeds=sweep_seeds, grid=grid,
                           store=store, beta=args.beta, timing_steps=timing_steps,
                           rule_sweep_seeds=rule_sweep_seeds,
                           progress=lambda line: print(line, file=sys.stderr, flush=True))
    finally:
        torch.set_num_threads(threads)
    result = {**provenance(), "command": "python -m asam_tune.bench.peers " + shlex.join(sys.argv[1:] if argv is None else argv),
              "load_average": {"start": [round(v, 2) for v in started_load],
                               "end": [round(v, 2) for v in os.getloadavg()]},
              "run_store": str(store.path), **result}
    if not args.no_plots:
        result["plots"] = write_plots(result, output)
    (output / "peers.md").write_text(markdown(result))
    return emit_result(result, str(output / "peers.json"), f"wrote {output / 'peers.json'} and {output / 'peers.md'}")


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "run_peers", "select_rho", "check_extras", "DEFAULT_METHODS"]
