"""What each ``asam-tune`` subcommand does. Heavy imports (torch) happen inside the commands
that need them; ``plan`` and ``show`` stay torch-free."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from rich.console import Console

from asam_tune.errors import RecordError, UserInputError

_console = Console(stderr=True)


def _workload_spec(args: argparse.Namespace) -> tuple[str, tuple[int, ...] | None, int | None]:
    if args.model is not None:
        # Console scripts do not put the working directory on sys.path; a user's
        # 'mymodels:factory' next to them should import as it would with 'python -m'.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        spec = args.model
    else:
        spec = args.workload or args.workload_default
        if args.input_shape is not None:
            raise UserInputError("--input-shape goes with --model, not with a built-in --workload")
    shape = None
    if args.input_shape is not None:
        from asam_tune.workloads import parse_shape

        shape = parse_shape(args.input_shape)
    return spec, shape, args.num_classes


def _print_json(document: object) -> None:
    print(json.dumps(document, indent=2, allow_nan=False))


def _warn(message: str) -> None:
    """One plain line on stderr, as main() prints warnings: not through rich, which would wrap
    it at the console's width (80 columns when stderr is not a terminal)."""
    print(f"asam-tune: warning: {message}", file=sys.stderr, flush=True)


def _warnings_only(update) -> None:
    """A profiler progress callback for commands without a progress bar."""
    if update.warning:
        _warn(update.message)


def run_profile(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from asam_tune.profiler import run_profile as measure
    from asam_tune.records import check_writable, dump_record

    check_writable(args.output)  # before minutes of measuring, not after
    spec, shape, classes = _workload_spec(args)
    devices = args.devices
    if devices is None:
        import torch

        devices = ("cpu",) + tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=_console, disable=not _console.is_terminal, transient=True) as bar:
        task = bar.add_task("profiling", total=None)

        def report(update) -> None:
            if update.warning:  # e.g. a busy machine: it must outlive the transient bar
                _warn(update.message)
                return
            bar.update(task, description=update.message, completed=update.done, total=update.total)

        profile = measure(spec, devices=devices, cpu_threads=args.cpu_threads, batch_sizes=args.batch_sizes,
                          quick=args.quick, input_shape=shape, num_classes=classes, progress=report)
    dump_record(profile, args.output)
    _show_record(profile, args.format)
    _console.print(f"profile written to {args.output}")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from asam_tune import api
    from asam_tune.records import check_writable, dump_record

    check_writable(args.output)
    profile = api.load_profile(args.profile)
    api.check_machine(profile, allow_other_machine=args.allow_other_machine)
    floor = "default" if args.min_perturbation_fraction is None else args.min_perturbation_fraction
    plan = api.plan_for(profile, args.batch_size, main_device=args.main_device, margin=args.margin,
                        reserved_cores=args.reserved_cores, nproc_per_node=args.nproc_per_node,
                        asynchronous=args.asynchronous, min_perturbation_fraction=floor, rho_rule=args.rho_rule)
    dump_record(plan, args.output)
    _show_record(plan, args.format)
    _console.print(f"plan written to {args.output}")
    return 0


def run_tune(args: argparse.Namespace) -> int:
    from asam_tune.tune.cli import run_tune as tune

    return tune(args)


def _load_any(path: str):
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


def _show_record(record, fmt: str) -> None:
    from asam_tune.cli import render
    from asam_tune.records import Plan
    from asam_tune.records.tuning import Tuning

    if fmt == "none":
        return
    if fmt == "json":
        _print_json(record.model_dump(mode="json"))
        return
    if isinstance(record, Tuning):
        from asam_tune.tune.render import render_tuning

        tables = render_tuning(record)
    else:
        tables = render.plan_tables(record) if isinstance(record, Plan) else render.profile_tables(record)
    render.print_tables(tables, Console())


def run_show(args: argparse.Namespace) -> int:
    record = _load_any(args.path)
    if args.plot is None and args.plan is not None:
        raise UserInputError("--plan goes with --plot (it marks the plan's b_p on the plotted curves)")
    if args.plot is not None:
        _plot_profile(record, args.plot, args.plan)
    _show_record(record, args.format)
    if args.plot is not None:
        _console.print(f"plot written to {args.plot}")
    return 0


def _plot_profile(record, path: str, plan_path: str | None) -> None:
    from asam_tune import api
    from asam_tune.records import Profile, check_writable

    if not isinstance(record, Profile):
        raise UserInputError(f"--plot draws a profile's curves; {record.kind!r} is not a profile")
    check_writable(path)
    from asam_tune.plots import plot_profile  # needs matplotlib: the 'plot' extra

    plot_profile(record, path, plan=None if plan_path is None else api.load_plan(plan_path))


def _load_plan_for_run(path: str | None, allow_other_machine: bool):
    if path is None:
        return None
    from asam_tune import api

    plan = api.load_plan(path)
    api.check_machine(plan, allow_other_machine=allow_other_machine)
    return plan


def _main_placement(plan):
    """Every method runs on the plan's main cores and threads (the worker gets the others), as
    the speed benchmark does, so their times compare like for like."""
    if plan is None or not plan.main_device.startswith("cpu"):
        return contextlib.nullcontext()
    from asam_tune.runtime.placement import main_process_placement

    return main_process_placement(plan)


def run_train(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from asam_tune.bench.training import METHODS, TrainConfig, train_mnist1d
    from asam_tune.cli import render

    spec, _, _ = _workload_spec(args)
    if spec != "mnist1d-cnn":
        raise UserInputError(f"train runs the built-in MNIST-1D task only (--workload mnist1d-cnn), got {spec!r}")
    unknown = [m for m in args.optimizers if m not in METHODS]
    if unknown:
        raise UserInputError(f"unknown --optimizers {','.join(unknown)} (choose from {', '.join(METHODS)})")
    plan = _load_plan_for_run(args.plan, args.allow_other_machine)
    batch_size = args.batch_size or (plan.batch_size if plan is not None else 100)
    if plan is not None and plan.workload.name != spec:
        raise UserInputError(f"the plan is for workload {plan.workload.name!r}, not {spec!r}")
    if plan is not None and plan.batch_size != batch_size:
        raise UserInputError(f"--batch-size {batch_size} differs from the plan's batch size {plan.batch_size}")
    results = []
    with _main_placement(plan), Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                         TimeElapsedColumn(), console=_console, disable=not _console.is_terminal,
                                         transient=True) as bar:
        for method in args.optimizers:
            task = bar.add_task(f"training with {method}", total=None)
            config = TrainConfig(method=method, epochs=args.epochs, batch_size=batch_size, lr=args.lr,
                                 rho=args.rho, seed=args.seed, label_noise=args.label_noise)
            results.append(train_mnist1d(config, plan=plan,
                                         progress=lambda done, total, t=task: bar.update(t, completed=done, total=total)))
    if args.format == "json":
        _print_json(results)
    else:
        render.print_tables([render.training_table(results)], Console())
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from asam_tune import api
    from asam_tune.bench.speed import markdown, run_speed_bench
    from asam_tune.cli import render

    spec, shape, classes = _workload_spec(args)
    plan = _load_plan_for_run(args.plan, args.allow_other_machine)
    from asam_tune.workloads import load_workload

    workload = load_workload(spec, input_shape=shape, num_classes=classes)
    if plan is None:
        from asam_tune.profiler import run_profile as measure

        _console.print("no --plan: profiling (quick) and planning first")
        devices = ("cpu",)
        import torch

        if torch.cuda.is_available():
            devices += ("cuda:0",)
        profile = measure(spec, devices=devices, quick=True, input_shape=shape, num_classes=classes,
                          batch_sizes=sorted({8, 32, args.batch_size}), progress=_warnings_only)
        plan = api.plan_for(profile, args.batch_size, asynchronous=True)
    elif plan.batch_size != args.batch_size:
        raise UserInputError(f"--batch-size {args.batch_size} differs from the plan's batch size {plan.batch_size}")
    if plan.workload.name != workload.name:
        raise UserInputError(f"the plan is for workload {plan.workload.name!r}, not {workload.name!r}")
    result = run_speed_bench(workload, plan, steps=args.steps,
                             progress=lambda message: _console.print(f"measuring {message}"))
    if args.format == "json":
        _print_json(result)
    elif args.format == "markdown":
        print(markdown(result))
    else:
        render.print_tables([render.bench_table(result)], Console())
    return 0
