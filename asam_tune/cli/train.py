"""``asam-tune train``: the README's main job, MNIST-1D with SGD, SAM and asynchronous SAM.

It says what it trains on (the label noise, without which SGD's 100% training accuracy looks
like a bug), keeps what finished when interrupted, saves the results with ``-o`` and ends
with the next step.
"""
from __future__ import annotations

import argparse
import contextlib
import json

from rich.console import Console

from asam_tune import arguments as types
from asam_tune.cli.commands import load_checked_plan, print_json, say
from asam_tune.errors import UserInputError

WORKLOAD = "mnist1d-cnn"
METHOD_CHOICES = ("sgd", "sam", "asam")  # what train offers (bench accuracy adds its ablation)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", choices=(WORKLOAD,), default=WORKLOAD,
                        help=f"the task: the built-in MNIST-1D CNN, the only one train runs (default: {WORKLOAD})")
    parser.add_argument("--plan", default=None, metavar="PLAN",
                        help="plan JSON for asynchronous SAM (default: no worker process; the ascent runs "
                             "in this process, one step stale)")
    parser.add_argument("--optimizers", type=types.csv, default=METHOD_CHOICES, metavar="LIST",
                        help=f"which of {','.join(METHOD_CHOICES)} to train, in order (default: all three)")
    parser.add_argument("--epochs", type=types.positive_int, default=60, metavar="N",
                        help="epochs (default 60, the accuracy benchmark's)")
    parser.add_argument("--batch-size", "-b", type=types.positive_int, default=None, metavar="B",
                        help="training batch size (default: the plan's, else 100)")
    parser.add_argument("--lr", type=types.positive_float, default=0.05,
                        help="base SGD's learning rate, cosine-annealed to 0 (default 0.05)")
    parser.add_argument("--rho", type=types.non_negative_float, default=0.3,
                        help="SAM's radius (default 0.3, the accuracy benchmark's; see docs/benchmarks.md)")
    parser.add_argument("--label-noise", type=types.fraction, default=0.3, metavar="FRACTION",
                        help="share of training labels flipped at random (default 0.3, where SAM's gain shows; "
                             "test labels stay clean)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the model's initialisation and the batch order (default 0)")
    types.add_allow_other_machine(parser)
    parser.add_argument("--output", "-o", default=None, metavar="RESULTS",
                        help="also write the results as JSON here (what finished, if interrupted)")
    parser.add_argument("--format", choices=("table", "json"), default="table",
                        help="print a table or the results as JSON on stdout (default: table)")


def _main_placement(plan):
    """Every method runs on the plan's main cores and threads (the worker gets the others), as
    the speed benchmark does, so their times compare like for like."""
    if plan is None or not plan.main_device.startswith("cpu"):
        return contextlib.nullcontext()
    from asam_tune.runtime.placement import main_process_placement

    return main_process_placement(plan)


def _document(args: argparse.Namespace, batch_size: int, results: list[dict], *, finished: bool) -> dict:
    from asam_tune.bench.provenance import provenance

    return {**provenance(), "task": "MNIST-1D", "label_noise": args.label_noise, "epochs": args.epochs,
            "batch_size": batch_size, "lr": args.lr, "rho": args.rho, "seed": args.seed, "plan": args.plan,
            "finished": finished, "methods": [r["method"] for r in results], "results": results}


def _report(args: argparse.Namespace, batch_size: int, results: list[dict], *, finished: bool) -> None:
    from asam_tune.cli import render

    if results:
        if args.format == "json":
            print_json(results)
        else:
            console = Console()
            render.print_tables([render.training_table(results, label_noise=args.label_noise)], console)
            console.print(render.TRAINING_LEGEND, style="dim", soft_wrap=True)
    if args.output is not None and results:
        from asam_tune.records.base import write_atomic

        document = _document(args, batch_size, results, finished=finished)
        write_atomic(args.output, json.dumps(document, indent=2, allow_nan=False) + "\n")
        say(f"results written to {args.output}")


def run(args: argparse.Namespace) -> int:
    from asam_tune.bench.training import TrainConfig, train_mnist1d
    from asam_tune.cli.progress import Progress

    unknown = [m for m in args.optimizers if m not in METHOD_CHOICES]
    if unknown:
        raise UserInputError(f"unknown --optimizers {','.join(unknown)} (choose from {', '.join(METHOD_CHOICES)})")
    if args.output is not None:
        from asam_tune.records import check_writable

        check_writable(args.output)  # before minutes of training
    plan = load_checked_plan(args.plan, args.allow_other_machine)
    batch_size = args.batch_size or (plan.batch_size if plan is not None else 100)
    if plan is not None and plan.workload.name != args.workload:
        raise UserInputError(f"the plan is for workload {plan.workload.name!r}, not {args.workload!r}")
    if plan is not None and plan.batch_size != batch_size:
        raise UserInputError(f"--batch-size {batch_size} differs from the plan's batch size {plan.batch_size}")
    say(f"MNIST-1D, {args.label_noise:.0%} of the training labels flipped at random (--label-noise), clean test "
        f"labels: training accuracy near 100% means the model memorised the noise; test accuracy is what counts. "
        f"{args.epochs} epochs at batch {batch_size}, rho {args.rho}.")
    results: list[dict] = []
    try:
        with _main_placement(plan), Progress() as progress:
            for method in args.optimizers:
                task = progress.add_task(f"training with {method}", total=None)
                config = TrainConfig(method=method, epochs=args.epochs, batch_size=batch_size, lr=args.lr,
                                     rho=args.rho, seed=args.seed, label_noise=args.label_noise)
                results.append(train_mnist1d(
                    config, plan=plan,
                    progress=lambda done, total, t=task: progress.update(t, completed=done, total=total)))
    except KeyboardInterrupt:
        done = ", ".join(r["method"] for r in results) or "none"
        say(f"asam-tune: interrupted; finished: {done}")
        _report(args, batch_size, results, finished=False)
        raise
    _report(args, batch_size, results, finished=True)
    if plan is None:
        say("next: profile and plan this machine (asam-tune profile ..., asam-tune plan ...) and train with "
            "--plan, or use AsyncSAM in your own loop (README, 'Using it in a training loop')")
    else:
        say(f"next: use the plan in your own loop: AsyncSAM(model, optimizer, loss_fn, rho={args.rho}, "
            f"plan={args.plan!r}) (README, 'Using it in a training loop')")
    return 0


__all__ = ["METHOD_CHOICES", "add_arguments", "run"]
