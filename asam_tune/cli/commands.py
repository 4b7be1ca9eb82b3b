"""``asam-tune profile``, ``plan`` and ``show``: their flags and what they do.

Heavy imports (torch) happen inside ``run_profile``; ``plan`` and ``show`` stay torch-free.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from asam_tune import arguments as types
from asam_tune.errors import RecordError, UserInputError
from asam_tune.records.profile import ascent_dtype_name

_console = Console(stderr=True)


def load_checked_plan(path: str | None, allow_other_machine: bool):
    """The plan at ``path`` (None: no plan), refused if made on another machine unless allowed."""
    if path is None:
        return None
    from asam_tune import api

    plan = api.load_plan(path)
    api.check_machine(plan, allow_other_machine=allow_other_machine)
    return plan


def print_json(document: object) -> None:
    print(json.dumps(document, indent=2, allow_nan=False))


def warn(message: str) -> None:
    """One plain line on stderr, as main() prints warnings: not through rich, which would wrap
    it at the console's width (80 columns when stderr is not a terminal)."""
    print(f"asam-tune: warning: {message}", file=sys.stderr, flush=True)


def say(message: str) -> None:
    """A plain line of information on stderr (stdout carries the tables or the JSON)."""
    print(message, file=sys.stderr, flush=True)


def warnings_only(update) -> None:
    """A profiler progress callback for commands without a progress display."""
    if update.warning:
        warn(update.message)


# ----------------------------------------------------------------------------- profile

def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    types.add_workload_args(parser)
    parser.add_argument("--devices", type=types.csv, default=None, metavar="LIST",
                        help="comma-separated: cpu,cuda:0,... (default: cpu and every visible GPU)")
    parser.add_argument("--cpu-threads", type=types.csv_ints, default=None, metavar="LIST",
                        help="CPU thread counts to measure (default: 1, 2, 4, ... up to the usable cores)")
    parser.add_argument("--batch-sizes", type=types.csv_ints, default=None, metavar="LIST",
                        help="batch sizes to measure (default: 8, 16, ..., 256; --quick: 8, 32, 128)")
    parser.add_argument("--quick", action="store_true", help="fewer points and shorter timings (about 2 minutes)")
    parser.add_argument("--ascent-dtype", default=None, metavar="DTYPE",
                        help="also time each candidate's ascent under autocast to bfloat16 or float16 (what "
                             "AsyncSAM(ascent_dtype=...) runs); plans made from the profile use it")
    parser.add_argument("--output", "-o", required=True, metavar="PROFILE",
                        help="where to write the profile JSON")
    parser.add_argument("--format", choices=("table", "json", "none"), default="table",
                        help="how to print the profile when done (default: table)")


def run_profile(args: argparse.Namespace) -> int:
    from asam_tune.cli.progress import Progress
    from asam_tune.profiler import run_profile as measure
    from asam_tune.records import check_writable
    from asam_tune.records.base import save_or_keep

    check_writable(args.output)  # before minutes of measuring, not after
    spec, shape, classes = types.workload_spec(args)
    ascent_dtype = ascent_dtype_name(args.ascent_dtype)  # a typo is one line now, not after minutes
    devices = args.devices
    if devices is None:
        import torch

        devices = ("cpu",) + tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    with Progress() as progress:
        task = progress.add_task("profiling", total=None)

        def report(update) -> None:
            if update.warning:  # e.g. a busy machine: it must outlive a transient bar
                warn(update.message)
                return
            progress.update(task, description=update.message, completed=update.done, total=update.total)

        profile = measure(spec, devices=devices, cpu_threads=args.cpu_threads, batch_sizes=args.batch_sizes,
                          quick=args.quick, input_shape=shape, num_classes=classes, progress=report,
                          ascent_dtype=ascent_dtype)
    save_or_keep(profile, args.output, "profile")
    show_record(profile, args.format)
    say(f"profile written to {args.output}")
    say(f"next: asam-tune plan {args.output} --batch-size B -o plan.json   (B: your training batch size)")
    return 0


# ----------------------------------------------------------------------------- plan

def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("profile", metavar="PROFILE", help="profile JSON written by 'asam-tune profile'")
    parser.add_argument("--batch-size", "-b", type=types.positive_int, required=True, metavar="B",
                        help="training batch size B")
    parser.add_argument("--main-device", default=None, metavar="KEY",
                        help="the main device as the profile names it, e.g. cuda:0 or cpu/1t (CPU, 1 thread) "
                             "(default: the fastest GPU; on a CPU-only profile every split of the cores is tried)")
    parser.add_argument("--margin", type=types.fraction, default=0.05,
                        help="share of the main step kept free as safety (default 0.05)")
    parser.add_argument("--reserved-cores", type=types.non_negative_int, default=0, metavar="N",
                        help="CPU cores kept for the main process's data loading (default 0)")
    parser.add_argument("--nproc-per-node", type=types.positive_int, default=1, metavar="K",
                        help="DDP ranks on this node (torchrun --nproc-per-node; default 1)")
    parser.add_argument("--asynchronous", action="store_true",
                        help="plan the best asynchronous split even where synchronous SAM on all cores "
                             "is predicted faster (the plan notes the cost)")
    parser.add_argument("--min-perturbation-fraction", type=types.positive_fraction, default=None, metavar="F",
                        help="quality floor: keep b_p >= F x B, hiding the ascent only partially if need be "
                             "(default: the floor measured for the rho rule; see docs/cost-model.md)")
    parser.add_argument("--rho-rule", choices=("default", "none"), default="default",
                        help="how the runtime scales rho as b_p shrinks: default (the measured rule) or none "
                             "(rho fixed at every b_p)")
    types.add_allow_other_machine(parser, "a profile")
    parser.add_argument("--output", "-o", required=True, metavar="PLAN", help="where to write the plan JSON")
    parser.add_argument("--format", choices=("table", "json", "none"), default="table",
                        help="how to print the plan (default: table)")


def run_plan(args: argparse.Namespace) -> int:
    from asam_tune import api
    from asam_tune.records import check_writable
    from asam_tune.records.base import save_or_keep

    check_writable(args.output)
    profile = api.load_profile(args.profile)
    api.check_machine(profile, allow_other_machine=args.allow_other_machine)
    floor = "default" if args.min_perturbation_fraction is None else args.min_perturbation_fraction
    plan = api.plan_for(profile, args.batch_size, main_device=args.main_device, margin=args.margin,
                        reserved_cores=args.reserved_cores, nproc_per_node=args.nproc_per_node,
                        asynchronous=args.asynchronous, min_perturbation_fraction=floor, rho_rule=args.rho_rule)
    save_or_keep(plan, args.output, "plan")
    show_record(plan, args.format)
    say(f"plan written to {args.output}")
    say(f"next: asam-tune train --plan {args.output}   or in your loop: AsyncSAM(model, optimizer, loss_fn, "
        f"plan={str(args.output)!r})")
    return 0


# ----------------------------------------------------------------------------- show

def add_show_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="FILE",
                        help="a profile, plan or tuning record (JSON written by profile, plan or tune)")
    parser.add_argument("--format", choices=("table", "json"), default="table",
                        help="tables with a legend, or the validated JSON (default: table)")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="for a profile: also write step time against batch size, log-log, per device "
                             "configuration (needs the 'plot' extra)")
    parser.add_argument("--plan", default=None, metavar="PLAN",
                        help="with --plot: mark this plan's b_p and B on the curves")


def load_any(path: str):
    """A profile, a plan or a tuning record, told apart by its 'kind'."""
    from asam_tune.records import Plan, Profile, load_record
    from asam_tune.records.tuning import Tuning

    try:
        kind = json.loads(Path(path).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None  # load_record below names the problem precisely
    if kind == "asam-tune-plan":
        return load_record(Plan, path)
    if kind == "asam-tune-profile":
        return load_record(Profile, path)
    if kind == "asam-tune-tuning":
        return load_record(Tuning, path)
    if kind is None:
        load_record(Profile, path)  # raises the precise error for unreadable files
    raise RecordError(path, "$.kind", "'asam-tune-profile', 'asam-tune-plan' or 'asam-tune-tuning'", kind)


def show_record(record, fmt: str) -> None:
    from asam_tune.cli import render
    from asam_tune.records import Plan
    from asam_tune.records.tuning import Tuning

    if fmt == "none":
        return
    if fmt == "json":
        print_json(record.model_dump(mode="json"))
        return
    if isinstance(record, Tuning):
        from asam_tune.tune.render import render_tuning

        tables, legend = render_tuning(record), render.TUNING_LEGEND
    elif isinstance(record, Plan):
        tables, legend = render.plan_tables(record), render.PLAN_LEGEND
    else:
        tables, legend = render.profile_tables(record), render.PROFILE_LEGEND
    console = Console()
    render.print_tables(tables, console)
    console.print(legend, style="dim", soft_wrap=True)


def run_show(args: argparse.Namespace) -> int:
    record = load_any(args.path)
    if args.plot is None and args.plan is not None:
        raise UserInputError("--plan goes with --plot (it marks the plan's b_p on the plotted curves)")
    if args.plot is not None:
        _plot_profile(record, args.plot, args.plan)
    show_record(record, args.format)
    if args.plot is not None:
        say(f"plot written to {args.plot}")
    return 0


def _plot_profile(record, path: str, plan_path: str | None) -> None:
    from asam_tune import api
    from asam_tune.records import Profile, check_writable

    if not isinstance(record, Profile):
        raise UserInputError(f"--plot draws a profile's curves; {record.kind!r} is not a profile")
    check_writable(path)
    from asam_tune.plots import plot_profile  # needs matplotlib: the 'plot' extra

    plot_profile(record, path, plan=None if plan_path is None else api.load_plan(plan_path))


__all__ = ["add_plan_arguments", "add_profile_arguments", "add_show_arguments", "load_any", "load_checked_plan",
           "print_json", "run_plan", "run_profile", "run_show", "say", "show_record", "warn", "warnings_only"]
