"""The command line's help, registry and plain progress (in-process, no torch needed for help)."""
from __future__ import annotations

import argparse
import io
import subprocess
import sys

import pytest

from asam_tune import arguments
from asam_tune.cli import main as cli_main
from asam_tune.cli.progress import Progress
from asam_tune.cli.registry import BENCHES, COMMANDS

EVERY_COMMAND = [(c.name, None) for c in COMMANDS if c.name != "bench"] + [("bench", b.name) for b in BENCHES]


def _parser_for(name: str, bench: str | None) -> argparse.ArgumentParser:
    argv = [name] + ([bench] if bench else [])
    parser = cli_main.build_parser(argv)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    if bench:
        sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[bench]
    return sub


@pytest.mark.parametrize("name, bench", EVERY_COMMAND)
def test_every_flag_has_help_and_every_command_an_example(name, bench):
    parser = _parser_for(name, bench)
    missing = [a.option_strings or a.dest for a in parser._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help and a.help.strip())]
    assert missing == []
    assert parser.epilog.startswith("example:\n  asam-tune ")
    example = parser.epilog.split("\n")[1].split()
    assert example[1] == name and (bench is None or example[2] == bench)


@pytest.mark.parametrize("name, bench", EVERY_COMMAND)
def test_each_example_parses(name, bench):
    entry = next(c for c in (BENCHES if bench else COMMANDS) if c.name == (bench or name))
    argv = entry.example.split()[1:]
    args = cli_main.build_parser(argv).parse_args(argv)
    assert args.command_entry is entry


def test_the_top_level_help_names_every_command_without_rst_markup(capsys):
    with pytest.raises(SystemExit):
        cli_main.main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text
    for entry in COMMANDS:
        assert f"    {entry.name}" in text
    assert "asam-tune profile" in text and "asam-tune plan" in text  # the usual order, as an example


def test_train_offers_only_what_it_runs():
    parser = _parser_for("train", None)
    options = {s for a in parser._actions for s in a.option_strings}
    assert "--model" not in options and "--input-shape" not in options
    workload = next(a for a in parser._actions if "--workload" in a.option_strings)
    assert workload.choices == ("mnist1d-cnn",)


def test_a_bench_without_a_name_is_the_speed_bench_as_before():
    args = cli_main.build_parser(["bench", "speed"]).parse_args(
        cli_main._with_default_bench(["bench", "--workload", "mnist1d-cnn", "-b", "32"]))
    assert (args.bench, args.batch_size, args.workload) == ("speed", 32, "mnist1d-cnn")
    assert cli_main._with_default_bench(["bench", "--help"]) == ["bench", "--help"]
    assert cli_main._with_default_bench(["--debug", "bench", "accuracy"]) == ["--debug", "bench", "accuracy"]


def test_the_bench_scripts_share_their_flags_with_the_cli(capsys):
    from asam_tune.bench import accuracy

    with pytest.raises(SystemExit):
        accuracy.main(["--help"])
    script_help = capsys.readouterr().out
    cli_help = _parser_for("bench", "accuracy").format_help()
    for flag in ("--plan", "--epochs", "--seeds", "--label-noise", "--methods", "--output"):
        assert flag in script_help and flag in cli_help


@pytest.mark.parametrize("module", ["accuracy", "adapt", "compare", "gpu_check"])
def test_python_m_bench_still_works(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_code:
        importlib.import_module(f"asam_tune.bench.{module}").main(["--help"])
    assert exit_code.value.code == 0
    assert "--out" in capsys.readouterr().out  # --output, or gpu-check's --out


def test_a_bench_script_error_is_one_line(tmp_path, capsys):
    from asam_tune.bench import compare

    assert compare.main(["--plan", str(tmp_path / "absent.json"), "--tuned", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("asam-tune: error: ") and "no such file" in err[0]


def test_the_built_in_names_match_the_workloads():
    from asam_tune.workloads import builtin_names

    assert tuple(sorted(arguments.BUILTIN_WORKLOADS)) == builtin_names()


def test_help_and_show_import_no_torch():
    code = ("import sys; from asam_tune.cli.main import build_parser; "
            "[build_parser([n]).format_help() for n in ('profile', 'plan', 'show', 'train', 'tune', 'bench')]; "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


# ----------------------------------------------------------------------------- progress

class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_without_a_terminal_progress_is_a_plain_line_every_few_seconds():
    clock, out = _Clock(), io.StringIO()
    with Progress(stream=out, terminal=False, every_s=5.0, clock=clock) as progress:
        task = progress.add_task("training with sgd", total=None)
        for step in range(1, 101):
            clock.now += 0.25  # 25 s in all
            progress.update(task, completed=step, total=100)
    lines = out.getvalue().splitlines()
    assert len(lines) == 5  # at 5, 10, 15, 20 and 25 s
    assert lines[0] == "asam-tune: training with sgd: 20/100 (20%), 5 s"
    assert lines[-1] == "asam-tune: training with sgd: 100/100 (100%), 25 s"


def test_a_short_command_prints_no_progress_line():
    clock, out = _Clock(), io.StringIO()
    with Progress(stream=out, terminal=False, clock=clock) as progress:
        task = progress.add_task("profiling")
        clock.now += 1
        progress.update(task, description="cpu/1t: batch 8 ok", completed=1, total=9)
    assert out.getvalue() == ""


def test_progress_lines_follow_the_description_and_advance():
    clock, out = _Clock(), io.StringIO()
    with Progress(stream=out, terminal=False, every_s=2.0, clock=clock) as progress:
        task = progress.add_task("trials", total=4)
        for _ in range(4):
            clock.now += 3
            progress.update(task, advance=1, description="trial")
    assert out.getvalue().splitlines()[-1] == "asam-tune: trial: 4/4 (100%), 12 s"


def test_on_a_terminal_progress_is_a_bar_that_leaves_no_lines():
    out = io.StringIO()
    with Progress(stream=out, terminal=True) as progress:
        task = progress.add_task("x", total=2)
        progress.update(task, advance=2)
    assert "asam-tune:" not in out.getvalue()
