"""asam-tune: profile this machine, plan asynchronous SAM, then train, tune or benchmark with the plan.

The commands are listed in ``cli/registry.py``; only the command that runs is imported, so
``asam-tune show plan.json`` and ``asam-tune plan`` never import torch. Every user error is one
line on stderr and exit code 2; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
import warnings
from collections.abc import Sequence

from asam_tune import __version__
from asam_tune.cli.registry import BENCHES, COMMANDS, Command
from asam_tune.errors import AsamTuneError

EXIT_USER_ERROR = 2
DESCRIPTION = ("Asynchronous Sharpness-Aware Minimization at SGD's cost: profile this machine, plan where "
               "the ascent gradient runs, then train, tune or benchmark with the plan.")
WORKFLOW = """\
the usual order:
  asam-tune profile --workload mnist1d-cnn --quick -o runs/profile.json
  asam-tune plan runs/profile.json --batch-size 100 -o runs/plan.json
  asam-tune train --plan runs/plan.json -o runs/results.json

'asam-tune COMMAND --help' shows a command's flags and an example."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags in our one-line style (exit code 2, as argparse does)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USER_ERROR, f"asam-tune: error: {message} (see {self.prog} --help)\n")


def _selected(argv: Sequence[str]) -> tuple[str | None, str | None]:
    """The command and, for ``bench``, the benchmark named on the command line (None: not given)."""
    # Only --debug, --version and --help come before the command, and none takes a value.
    at = next((i for i, word in enumerate(argv) if not word.startswith("-")), None)
    if at is None:
        return None, None
    name = argv[at]
    following = argv[at + 1] if at + 1 < len(argv) else None
    bench = following if name == "bench" and following is not None and not following.startswith("-") else None
    return name, bench


def _add_command(subparsers, entry: Command, selected: bool) -> argparse.ArgumentParser:
    description = textwrap.fill(entry.description or entry.summary[:1].upper() + entry.summary[1:] + ".", 79)
    parser = subparsers.add_parser(entry.name, help=entry.summary, description=description,
                                   epilog=f"example:\n  {entry.example}")
    if selected and entry.arguments:
        entry.load("arguments")(parser)
    parser.set_defaults(command_entry=entry)
    return parser


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser, with the flags of the command (and benchmark) that ``argv`` names."""
    name, bench = _selected(argv)
    parser = _Parser(prog="asam-tune", description=textwrap.fill(DESCRIPTION, 79), epilog=WORKFLOW)
    parser.add_argument("--version", action="version", version=f"asam-tune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for entry in COMMANDS:
        sub = _add_command(commands, entry, entry.name == name)
        if entry.name == "bench":
            kinds = sub.add_subparsers(dest="bench", required=True, metavar="BENCHMARK", parser_class=_Parser)
            for kind in BENCHES:
                _add_command(kinds, kind, name == "bench" and kind.name == bench)
    return parser


def _with_default_bench(argv: list[str]) -> list[str]:
    """``asam-tune bench --workload ...`` (no benchmark named) is the speed benchmark, as it was."""
    name, bench = _selected(argv)
    if name != "bench" or bench is not None:
        return argv
    at = argv.index("bench") + 1
    rest = argv[at:]
    if not rest or rest[0] in ("-h", "--help"):
        return argv
    return argv[:at] + ["speed"] + rest


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"asam-tune: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = _with_default_bench(list(sys.argv[1:] if argv is None else argv))
    args = build_parser(argv).parse_args(argv)
    if not args.debug:
        warnings.showwarning = _one_line_warning
    try:
        return args.command_entry.load("run")(args) or 0
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
