"""``asam-tune tune``: its flags (``add_arguments``) and what it does (``run``).

Outputs, next to ``--output tuned.json``: the tuned plan itself, ``tuned.tuning.json`` (the
tuning record: every trial, measured beside predicted) and ``tuned.study.db`` (the Optuna
study; running the same command again resumes it and adds ``--trials`` more).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

from rich.console import Console

from asam_tune import arguments as types
from asam_tune.arguments import fraction as _fraction
from asam_tune.arguments import non_negative_float as _non_negative_float
from asam_tune.arguments import non_negative_int as _non_negative_int
from asam_tune.arguments import positive_float as _positive_float
from asam_tune.arguments import positive_int as _positive_int
from asam_tune.cli.commands import say, warn
from asam_tune.errors import UserInputError
from asam_tune.tune.study import DEFAULT_CONFIRM_ROUNDS  # no optuna, no torch at import
from asam_tune.tune.window import MAX_STEPS_FACTOR

DEFAULT_TRIALS = 20
DEFAULT_STEPS_PER_TRIAL = 20
DEFAULT_WARMUP_STEPS = 5
DEFAULT_MIN_TRIAL_SECONDS = 3.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``tune`` command's flags."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--plan", metavar="PLAN", help="plan JSON to refine")
    source.add_argument("--profile", metavar="PROFILE", help="profile JSON to plan from first (with --batch-size)")
    parser.add_argument("--batch-size", "-b", type=_positive_int, default=None, metavar="B",
                        help="training batch size B (required with --profile)")
    types.add_workload_args(parser, default=None, default_text="the plan's; a plan never imports code, so "
                                                               "name your --model here")
    parser.add_argument("--trials", type=_positive_int, default=DEFAULT_TRIALS,
                        help=f"trials to run now; a resumed study adds them (default {DEFAULT_TRIALS})")
    parser.add_argument("--timeout", type=_positive_float, default=None, metavar="S",
                        help="start no trial after S seconds")
    parser.add_argument("--output", "-o", required=True, help="where to write the tuned plan JSON")
    parser.add_argument("--storage", default=None,
                        help="Optuna storage URL (default: sqlite:///<output without .json>.study.db)")
    parser.add_argument("--study-name", default=None, help="study name in the storage (default: asam-tune)")
    parser.add_argument("--steps-per-trial", type=_positive_int, default=DEFAULT_STEPS_PER_TRIAL,
                        help=f"timed steps per trial (default {DEFAULT_STEPS_PER_TRIAL}, at least 3)")
    parser.add_argument("--warmup-steps", type=_non_negative_int, default=DEFAULT_WARMUP_STEPS,
                        help=f"untimed steps before them (default {DEFAULT_WARMUP_STEPS})")
    parser.add_argument("--min-trial-seconds", type=_non_negative_float, default=DEFAULT_MIN_TRIAL_SECONDS,
                        metavar="S", help=f"and keep timing until S seconds of timed steps have passed, at most "
                                          f"{MAX_STEPS_FACTOR}x --steps-per-trial steps "
                                          f"(default {DEFAULT_MIN_TRIAL_SECONDS:g}; 0: exactly --steps-per-trial)")
    parser.add_argument("--confirm-rounds", type=_non_negative_int, default=DEFAULT_CONFIRM_ROUNDS, metavar="R",
                        help=f"after the trials, measure the finalists again R times each, in alternation, and "
                             f"choose from the pooled windows (default {DEFAULT_CONFIRM_ROUNDS}; 0: no confirmation)")
    parser.add_argument("--margin", type=_fraction, default=None,
                        help="allowed wait and distance from SGD's step, as a share (default: the plan's)")
    parser.add_argument("--rho", type=float, default=0.05,
                        help="SAM's radius in the trials (default 0.05; step times barely depend on it)")
    parser.add_argument("--seed", type=int, default=0, help="the Optuna sampler's seed (default 0)")
    types.add_allow_other_machine(parser, "a plan or profile")
    parser.add_argument("--format", choices=("table", "json"), default="table",
                        help="print tables or the tuning record as JSON (default: table)")


# ----------------------------------------------------------------------------- paths

def _stem(output: Path) -> Path:
    return output.with_suffix("") if output.suffix == ".json" else output


def tuning_record_path(output: str | os.PathLike) -> Path:
    """'tuned.json' -> 'tuned.tuning.json'."""
    output = Path(output)
    return _stem(output).with_name(_stem(output).name + ".tuning.json")


def default_storage(output: str | os.PathLike) -> str:
    """'tuned.json' -> 'sqlite:////abs/tuned.study.db'."""
    stem = _stem(Path(output).resolve())
    return f"sqlite:///{stem.with_name(stem.name + '.study.db')}"


# ----------------------------------------------------------------------------- the command

def _source_plan(args: argparse.Namespace):
    from asam_tune import api

    if args.plan is not None:
        plan = api.load_plan(args.plan)
        api.check_machine(plan, allow_other_machine=args.allow_other_machine)
        if args.batch_size is not None and args.batch_size != plan.batch_size:
            raise UserInputError(f"--batch-size {args.batch_size} differs from the plan's batch size {plan.batch_size}")
        return plan
    if args.batch_size is None:
        raise UserInputError("--profile needs --batch-size: the plan to tune is made for one batch size")
    profile = api.load_profile(args.profile)
    api.check_machine(profile, allow_other_machine=args.allow_other_machine)
    margin = args.margin if args.margin is not None else 0.05
    return api.plan_for(profile, args.batch_size, margin=margin)


def _workload(args: argparse.Namespace, plan):
    from asam_tune.workloads import BUILTINS, load_workload

    spec, shape, classes = types.workload_spec(args, fallback=plan.workload.name)
    if args.model is None and spec not in BUILTINS:
        raise UserInputError(f"the plan is for model {spec!r}: pass --model {spec} to import it "
                             f"(a plan never imports code)")
    workload = load_workload(spec, input_shape=shape, num_classes=classes)
    if workload.name != plan.workload.name:
        raise UserInputError(f"the plan is for workload {plan.workload.name!r}, not {workload.name!r}")
    return workload


def _nearest_cores(plan, main_device: str) -> tuple[int, ...]:
    if not main_device.startswith("cuda:"):
        return ()
    index = int(main_device.split(":")[1])
    gpu = next((g for g in plan.profile_fingerprint.gpus if g.index == index), None)
    return tuple(gpu.nearest_cores or ()) if gpu is not None else ()


def run(args: argparse.Namespace) -> int:
    from asam_tune.fingerprint import usable_core_ids
    from asam_tune.records.base import save_or_keep
    from asam_tune.tune.render import render_tuning
    from asam_tune.tune.result import tuned_plan, tuning_record
    from asam_tune.tune.space import SearchSpace
    from asam_tune.tune.study import STUDY_NAME, run_study

    if not (isinstance(args.rho, (int, float)) and 0 < args.rho < float("inf")):
        raise UserInputError(f"Invalid --rho: {args.rho!r} (tuning needs a finite rho > 0)")
    if args.steps_per_trial < 3:
        raise UserInputError(f"--steps-per-trial {args.steps_per_trial} is too few: at least 3 timed steps")
    # argparse checks these on the command line; a Namespace built in code is checked here.
    seconds = args.min_trial_seconds
    if not (isinstance(seconds, (int, float)) and 0 <= seconds < float("inf")):
        raise UserInputError(f"Invalid --min-trial-seconds: {seconds!r} (expected a number >= 0; 0 disables)")
    if not (isinstance(args.confirm_rounds, int) and args.confirm_rounds >= 0):
        raise UserInputError(f"Invalid --confirm-rounds: {args.confirm_rounds!r} (expected an integer >= 0)")
    plan = _source_plan(args)
    margin = args.margin if args.margin is not None else plan.margin
    workload = _workload(args, plan)
    usable = tuple(usable_core_ids())  # before any trial pins this process
    space = SearchSpace.from_plan(plan, len(usable))
    nearest = _nearest_cores(plan, space.main_device)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)  # SQLite makes the file, not its folder
    storage = args.storage or default_storage(output)
    study_name = args.study_name or STUDY_NAME
    identity = {"workload": plan.workload.name, "parameter_shapes_hash": plan.workload.parameter_shapes_hash,
                "batch_size": plan.batch_size, "main_device": space.main_device,
                "perturbations": list(space.perturbations), "core_budget": space.core_budget}

    from asam_tune.cli.progress import Progress
    from asam_tune.tune.trial import WorkloadTrialRunner  # torch: only once the inputs are known good

    new_file = _new_sqlite_file(storage)
    try:
        with Progress() as progress:
            task = progress.add_task("measuring SGD and SAM, then the cost model's choice", total=args.trials)

            def report(outcome) -> None:
                label = outcome.config.label() if outcome.config is not None else "?"
                progress.update(task, advance=1, description=f"trial {outcome.number} ({label}): {outcome.state}")

            def confirming(finalist, round_number: int) -> None:
                progress.update(task, description=f"confirming trial {finalist.outcome.number} "
                                                  f"({finalist.outcome.config.label()}), round {round_number} "
                                                  f"of {args.confirm_rounds}")

            with WorkloadTrialRunner(workload, plan, space, usable, steps=args.steps_per_trial,
                                     warmup=args.warmup_steps, rho=args.rho, nearest_cores=nearest,
                                     min_seconds=args.min_trial_seconds) as runner:
                result = run_study(space, runner, margin=margin, n_trials=args.trials, timeout_s=args.timeout,
                                   storage=storage, study_name=study_name, seed=args.seed,
                                   planned=space.planned_config(plan), identity=identity, on_trial=report,
                                   confirm_rounds=args.confirm_rounds, on_confirmation=confirming)
    except BaseException:
        if new_file is not None:
            discard_if_empty(new_file)  # a failed first run leaves no empty study behind
        raise

    from asam_tune.steptiming import baseline_warning

    for message in (baseline_warning(result.baseline.sgd_step_s, plan.predictions.sgd_step_s, "SGD"),
                    baseline_warning(result.baseline.sam_step_s, plan.predictions.sam_step_s, "SAM")):
        if message:
            warn(message)
    tuned = tuned_plan(plan, space, result, margin=margin, usable_core_ids=usable, nearest_cores=nearest)
    record = tuning_record(plan, tuned, result, margin=margin, steps=args.steps_per_trial, warmup=args.warmup_steps,
                           min_trial_seconds=args.min_trial_seconds, confirm_rounds=args.confirm_rounds)
    record_path = tuning_record_path(output)
    if tuned is not None:
        save_or_keep(tuned, output, "tuned-plan")
    save_or_keep(record, record_path, "tuning-record")
    if args.format == "json":
        print(json.dumps(record.model_dump(mode="json"), indent=2, allow_nan=False))
    else:
        from asam_tune.cli import render

        console = Console()
        for table in render_tuning(record):
            console.print(table)
        console.print(render.TUNING_LEGEND, style="dim", soft_wrap=True)
    if tuned is None:
        say(f"no plan written: {result.choice.reason}; trials recorded in {record_path}")
        say(f"next: more trials (the same command resumes the study), or keep the plan {plan_source(args)}")
        return 1
    say(f"tuned plan written to {output}; tuning record to {record_path}; study in {storage} "
        f"({result.new_trials} new trial(s), {len(result.outcomes)} in all)")
    say(f"next: asam-tune train --plan {output}, or AsyncSAM(..., plan={str(output)!r}) in your loop")
    return 0


def plan_source(args: argparse.Namespace) -> str:
    return args.plan if args.plan is not None else f"from {args.profile}"


def _new_sqlite_file(storage: str) -> Path | None:
    """The SQLite file ``storage`` names when this run is about to create it, else None."""
    prefix = "sqlite:///"
    if not storage.startswith(prefix):
        return None
    path = Path(storage[len(prefix):])
    return None if path.exists() or str(path) in ("", ":memory:") else path


def discard_if_empty(path: Path) -> None:
    """Remove an SQLite study file that holds no trial (0 bytes, or Optuna's tables only)."""
    import sqlite3

    if not path.exists():
        return
    if path.stat().st_size > 0:
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                if db.execute("SELECT COUNT(*) FROM trials").fetchone()[0] > 0:
                    return  # finished trials: a rerun resumes from them
        except sqlite3.Error:
            pass  # no trials table: nothing was recorded
    path.unlink(missing_ok=True)
