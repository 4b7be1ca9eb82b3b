"""Command-line vocabulary shared by ``asam-tune`` and the benchmark scripts (no torch import).

A leaf module: argparse value types that reject a bad value with its text, the workload flags
(``--workload`` | ``--model`` with ``--input-shape`` and ``--num-classes``) and how they resolve
to a workload spec, and the few flags every command spells the same way. ``cli/``, ``tune/`` and
``bench/`` all build their parsers from it, so none of them imports another's parser code.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from asam_tune.errors import UserInputError

# asam_tune.workloads.builtin_names(), without importing torch (a test keeps them equal).
BUILTIN_WORKLOADS = ("mnist1d-cnn", "resnet20", "vit-tiny")


# ----------------------------------------------------------------------------- value types

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _number(text: str, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, "a positive number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, "a number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    value = _number(text, "a number in [0, 1)")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def positive_fraction(text: str) -> float:
    value = _number(text, "a number in (0, 1]")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def csv_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def csv(text: str) -> tuple[str, ...]:
    values = tuple(part.strip() for part in text.split(",") if part.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return values


# ----------------------------------------------------------------------------- workload flags

def add_workload_args(parser: argparse.ArgumentParser, *, default: str | None = "mnist1d-cnn",
                      default_text: str | None = None) -> None:
    """``--workload NAME`` or ``--model PACKAGE.MODULE:FACTORY`` (with ``--input-shape`` and
    ``--num-classes``). ``default``: the workload when neither is given; None with
    ``default_text`` (e.g. "the plan's") when the command finds it elsewhere."""
    shown = default if default is not None else default_text
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--workload", default=None, metavar="NAME",
                       help=f"built-in workload: {', '.join(BUILTIN_WORKLOADS)} (default: {shown})")
    group.add_argument("--model", default=None, metavar="PACKAGE.MODULE:FACTORY",
                       help="your own model: a function returning an nn.Module (needs --input-shape and "
                            "--num-classes unless it also returns an example-batch function)")
    parser.add_argument("--input-shape", default=None, metavar="C,H,W",
                        help="per-sample input shape for --model, e.g. 3,32,32")
    parser.add_argument("--num-classes", type=positive_int, default=None, metavar="K",
                        help="number of classes the --model predicts")
    parser.set_defaults(workload_default=default)


def workload_spec(args: argparse.Namespace,
                  fallback: str | None = None) -> tuple[str, tuple[int, ...] | None, int | None]:
    """(spec, input shape, number of classes) from the workload flags; ``fallback`` when neither
    --workload nor --model was given and the parser has no default."""
    if args.model is not None:
        # Console scripts do not put the working directory on sys.path; a user's
        # 'mymodels:factory' next to them should import as it would with 'python -m'.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        spec = args.model
    else:
        spec = args.workload or getattr(args, "workload_default", None) or fallback
        if args.input_shape is not None:
            raise UserInputError("--input-shape goes with --model, not with a built-in --workload")
        if spec is None:
            raise UserInputError(f"no workload: pass --workload ({', '.join(BUILTIN_WORKLOADS)}) or --model")
    shape = None
    if args.input_shape is not None:
        from asam_tune.workloads import parse_shape

        shape = parse_shape(args.input_shape)
    return spec, shape, args.num_classes


def add_allow_other_machine(parser: argparse.ArgumentParser, what: str = "a plan") -> None:
    parser.add_argument("--allow-other-machine", action="store_true",
                        help=f"use {what} made on another machine (a warning instead of an error; its "
                             "timings may not hold here)")


def script_main(doc: str, add_arguments, run, argv=None) -> int:
    """``python -m asam_tune.bench.X``: the parser from ``add_arguments``, then ``run(args)``; a user
    error is one line on stderr and exit code 2, as under ``asam-tune bench X``."""
    lines = doc.strip().splitlines()
    parser = argparse.ArgumentParser(description=lines[0], epilog="\n".join(lines[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return exit_code_of(lambda: run(args))


def exit_code_of(run) -> int:
    """``run()``'s exit code (None: 0); a user error is one line on stderr and exit code 2."""
    from asam_tune.errors import AsamTuneError

    try:
        return run() or 0
    except AsamTuneError as exc:
        print(f"asam-tune: error: {exc}", file=sys.stderr)
        return 2


__all__ = [
    "BUILTIN_WORKLOADS", "add_allow_other_machine", "exit_code_of", "script_main", "add_workload_args", "csv", "csv_ints", "fraction",
    "non_negative_float", "non_negative_int", "positive_float", "positive_int", "workload_spec",
]
