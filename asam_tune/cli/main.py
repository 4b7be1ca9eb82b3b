"""``asam-tune``: profile, plan, show, train, bench.

Each subcommand imports what it needs when it runs, so ``asam-tune show plan.json`` and
``asam-tune plan`` never import torch. Every user error is one line on stderr and exit code 2;
``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from asam_tune import __version__
from asam_tune.cli import args as types
from asam_tune.errors import AsamTuneError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags in our one-line style (exit code 2, as argparse does)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USER_ERROR, f"asam-tune: error: {message} (see {self.prog} --help)\n")


def _add_workload_args(parser: argparse.ArgumentParser, *, default: str | None = "mnist1d-cnn") -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--workload", default=None,
                       help=f"built-in workload: mnist1d-cnn, resnet20, vit-tiny (default: {default})")
    group.add_argument("--model", default=None, metavar="PACKAGE.MODULE:FACTORY",
                       help="your own model factory (needs --input-shape and --num-classes "
                            "unless it also returns an example-batch function)")
    parser.add_argument("--input-shape", default=None, metavar="C,H,W",
                        help="per-sample input shape for --model, e.g. 3,32,32")
    parser.add_argument("--num-classes", type=types.positive_int, default=None)
    parser.set_defaults(workload_default=default)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="asam-tune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"asam-tune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    profile = commands.add_parser("profile", help="measure forward/backward, optimizer and transfer times")
    _add_workload_args(profile)
    profile.add_argument("--devices", type=types.csv, default=None,
                         help="comma-separated: cpu,cuda:0,... (default: cpu and every visible GPU)")
    profile.add_argument("--cpu-threads", type=types.csv_ints, default=None,
                         help="CPU thread counts to measure (default: a few up to the usable cores)")
    profile.add_argument("--batch-sizes", type=types.csv_ints, default=None,
                         help="batch sizes to measure (default: a geometric sweep)")
    profile.add_argument("--quick", action="store_true", help="fewer points, shorter timings")
    profile.add_argument("--output", "-o", required=True, help="where to write the profile JSON")
    profile.add_argument("--format", choices=("table", "json", "none"), default="table")

    plan = commands.add_parser("plan", help="choose the perturbation device and batch size from a profile")
    plan.add_argument("profile", help="profile JSON written by 'asam-tune profile'")
    plan.add_argument("--batch-size", "-b", type=types.positive_int, required=True, help="training batch size B")
    plan.add_argument("--main-device", default=None, help="main device key, e.g. cuda:0 or cpu/1t")
    plan.add_argument("--margin", type=types.fraction, default=0.05, help="safety margin (default 0.05)")
    plan.add_argument("--reserved-cores", type=types.non_negative_int, default=0,
                      help="CPU cores kept for the main process's data loading")
    plan.add_argument("--nproc-per-node", type=types.positive_int, default=1, help="DDP ranks on this node")
    plan.add_argument("--asynchronous", action="store_true",
                      help="plan the best asynchronous split even where synchronous SAM on all cores "
                           "is predicted faster (the plan notes the cost)")
    plan.add_argument("--min-perturbation-fraction", type=types.positive_fraction, default=None, metavar="F",
                      help="quality floor: keep b_p >= F x B, hiding the ascent only partially if need be "
                           "(default: the floor measured for the rho rule; see docs/cost-model.md)")
    plan.add_argument("--rho-rule", choices=("default", "none"), default="default",
                      help="how the runtime scales rho as b_p shrinks: default (the measured rule) or none "
                           "(rho fixed)")
    plan.add_argument("--allow-other-machine", action="store_true",
                      help="plan from a profile measured on another machine (warns)")
    plan.add_argument("--output", "-o", required=True, help="where to write the plan JSON")
    plan.add_argument("--format", choices=("table", "json", "none"), default="table")

    show = commands.add_parser("show", help="render a profile or a plan")
    show.add_argument("path")
    show.add_argument("--format", choices=("table", "json"), default="table")
    show.add_argument("--plot", default=None, metavar="FILE.png",
                      help="for a profile: also write step time against batch size, log-log, per device "
                           "configuration (needs the 'plot' extra)")
    show.add_argument("--plan", default=None, metavar="PLAN",
                      help="with --plot: mark this plan's b_p and B on the curves")

    train = commands.add_parser(
        "train", help="train a built-in workload with SGD, SAM and asynchronous SAM side by side")
    _add_workload_args(train)
    train.add_argument("--plan", default=None, help="plan JSON (default: in-process synchronous worker)")
    train.add_argument("--optimizers", type=types.csv, default=("sgd", "sam", "asam"),
                       help="which of sgd,sam,asam to train (default: all three)")
    train.add_argument("--epochs", type=types.positive_int, default=60,
                       help="epochs (default 60, the accuracy benchmark's)")
    train.add_argument("--batch-size", "-b", type=types.positive_int, default=None,
                       help="training batch size (default: the plan's, else 100)")
    train.add_argument("--lr", type=types.positive_float, default=0.05)
    train.add_argument("--rho", type=types.non_negative_float, default=0.3,
                       help="SAM's radius (default 0.3, the accuracy benchmark's; see docs/benchmarks.md)")
    train.add_argument("--label-noise", type=types.fraction, default=0.3,
                       help="share of training labels flipped (default 0.3, where SAM's gain shows)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--allow-other-machine", action="store_true")
    train.add_argument("--format", choices=("table", "json"), default="table")

    bench = commands.add_parser("bench", help="measure SGD, SAM and asynchronous SAM step times")
    _add_workload_args(bench)
    bench.add_argument("--batch-size", "-b", type=types.positive_int, required=True)
    bench.add_argument("--steps", type=types.positive_int, default=30)
    bench.add_argument("--plan", default=None)
    bench.add_argument("--allow-other-machine", action="store_true")
    bench.add_argument("--format", choices=("table", "json", "markdown"), default="table")

    from asam_tune.tune.cli import add_tune_parser

    add_tune_parser(commands)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"asam-tune: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    from asam_tune.cli import commands

    handler = getattr(commands, f"run_{args.command}")
    if not args.debug:
        warnings.showwarning = _one_line_warning
    try:
        return handler(args) or 0
    except AsamTuneError as exc:
        if args.debug:
            raise
        print(f"asam-tune: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("asam-tune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
