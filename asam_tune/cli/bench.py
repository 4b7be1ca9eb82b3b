"""``asam-tune bench speed``: SGD, SAM and asynchronous SAM step times measured in one run.

(The other benchmarks under ``asam-tune bench`` bring their own flags and code: see
``cli/registry.py``.)
"""
from __future__ import annotations

import argparse

from rich.console import Console

from asam_tune import arguments as types
from asam_tune.cli.commands import load_checked_plan, print_json, say, warn, warnings_only
from asam_tune.errors import UserInputError


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    types.add_workload_args(parser)
    parser.add_argument("--batch-size", "-b", type=types.positive_int, required=True, metavar="B",
                        help="training batch size B (the plan's, when --plan is given)")
    parser.add_argument("--steps", type=types.positive_int, default=30, metavar="N",
                        help="timed steps per method, after 5 untimed warm-up steps (default 30, at least 3)")
    parser.add_argument("--plan", default=None, metavar="PLAN",
                        help="plan JSON whose worker and b_p to measure (default: profile quickly and plan first)")
    types.add_allow_other_machine(parser)
    parser.add_argument("--format", choices=("table", "json", "markdown"), default="table",
                        help="a table, the full result as JSON, or markdown for docs/ (default: table)")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="also write a timeline of asynchronous SAM's main steps and worker jobs: the "
                             "overlap, and where the main step waited (needs the 'plot' extra)")


def run_speed(args: argparse.Namespace) -> int:
    from asam_tune import api
    from asam_tune.bench.speed import markdown, run_speed_bench
    from asam_tune.cli import render
    from asam_tune.workloads import load_workload

    spec, shape, classes = types.workload_spec(args)
    plan = load_checked_plan(args.plan, args.allow_other_machine)
    workload = load_workload(spec, input_shape=shape, num_classes=classes)
    if plan is None:
        import torch

        from asam_tune.profiler import run_profile as measure

        say("no --plan: profiling (quick) and planning first")
        devices = ("cpu",) + (("cuda:0",) if torch.cuda.is_available() else ())
        profile = measure(spec, devices=devices, quick=True, input_shape=shape, num_classes=classes,
                          batch_sizes=sorted({8, 32, args.batch_size}), progress=warnings_only)
        plan = api.plan_for(profile, args.batch_size, asynchronous=True)
    elif plan.batch_size != args.batch_size:
        raise UserInputError(f"--batch-size {args.batch_size} differs from the plan's batch size {plan.batch_size}")
    if plan.workload.name != workload.name:
        raise UserInputError(f"the plan is for workload {plan.workload.name!r}, not {workload.name!r}")
    if args.plot is not None:
        from asam_tune.plots import require_matplotlib
        from asam_tune.records import check_writable

        require_matplotlib()
        check_writable(args.plot)
    result = run_speed_bench(workload, plan, steps=args.steps, progress=lambda message: say(f"measuring {message}"))
    if args.plot is not None:
        from asam_tune.plots import plot_timeline

        plot_timeline(result["asam"]["timeline"], args.plot,
                      title=f"{workload.name}, B={plan.batch_size}, b_p={plan.perturbation_batch_size}, "
                            f"worker {plan.perturbation.key}")
        say(f"timeline written to {args.plot}")
    if args.format == "json":
        print_json(result)
    elif args.format == "markdown":
        print(markdown(result))
    else:
        console = Console()
        render.print_tables([render.bench_table(result)], console)
        console.print(render.BENCH_LEGEND, style="dim", soft_wrap=True)
    for message in result["warnings"]:
        warn(message)
    say("next: --format markdown for a table with its provenance, or 'asam-tune tune --plan PLAN' to refine "
        "the plan with measured trials")
    return 0


__all__ = ["add_speed_arguments", "run_speed"]
