"""The command line through a subprocess: exit codes, one-line errors, the stages end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from asam_tune.records import Plan, Profile, dump_record, load_record
from tests.record_factories import small_profile


def cli(*args: str, cwd=None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asam_tune.cli.main", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("asam-tune: warning:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_version_and_help():
    assert cli("--version").stdout.startswith("asam-tune ")
    assert cli("--help").returncode == 0


@pytest.mark.parametrize("args, needles", [
    (("plan",), ("required",)),
    (("plan", "p.json", "--batch-size", "0", "-o", "x.json"), ("--batch-size", "'0'")),
    (("profile", "--batch-sizes", "8,x", "-o", "p.json"), ("--batch-sizes", "8,x")),
    (("nonsense",), ("invalid choice",)),
])
def test_bad_flags_are_one_line_errors(tmp_path, args, needles):
    one_line_error(cli(*args, cwd=tmp_path), *needles)


def test_missing_and_corrupt_files(tmp_path):
    one_line_error(cli("show", str(tmp_path / "absent.json")), "absent.json", "no such file")
    (tmp_path / "bad.json").write_text('{"schema_version": 1, "kind": "asam-tune-plan", "batch_size": "x"}')
    one_line_error(cli("show", str(tmp_path / "bad.json")), "bad.json", "$.")
    (tmp_path / "other.json").write_text('{"kind": "something-else"}')
    one_line_error(cli("show", str(tmp_path / "other.json")), "other.json", "$.kind")


@pytest.mark.parametrize("args, needles", [
    (("--workload", "resnet99"), ("resnet99",)),
    (("--model", "no_such_module_xyz:factory", "--input-shape", "3", "--num-classes", "2"),
     ("no_such_module_xyz",)),
])
def test_bad_workloads_are_one_line_errors(tmp_path, args, needles):
    one_line_error(cli("profile", *args, "--quick", "-o", str(tmp_path / "p.json")), *needles)
    assert not (tmp_path / "p.json").exists()


def test_unwritable_outputs_fail_before_any_work(tmp_path):
    profile = tmp_path / "profile.json"
    dump_record(small_profile(), profile)
    one_line_error(cli("plan", str(profile), "-b", "64", "--allow-other-machine", "-o", str(tmp_path)),
                   "cannot write", "directory")
    (tmp_path / "file").write_text("")
    one_line_error(cli("profile", "--quick", "-o", str(tmp_path / "file" / "p.json")), "cannot write")


def test_train_refuses_a_plan_for_another_workload_or_batch_size(tmp_path):
    profile, plan = tmp_path / "profile.json", tmp_path / "plan.json"
    dump_record(small_profile(), profile)
    assert cli("plan", str(profile), "-b", "64", "--allow-other-machine", "-o", str(plan)).returncode == 0
    one_line_error(cli("train", "--plan", str(plan), "--allow-other-machine", "-b", "32"),
                   "--batch-size 32", "64")
    # train offers only the task it runs (its help lists no other).
    one_line_error(cli("train", "--workload", "resnet20", "--plan", str(plan), "--allow-other-machine"),
                   "--workload", "resnet20", "mnist1d-cnn")


def test_debug_shows_the_traceback(tmp_path):
    result = cli("--debug", "show", str(tmp_path / "absent.json"))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_plan_and_show_from_a_profile_without_torch(tmp_path):
    profile = tmp_path / "profile.json"
    dump_record(small_profile(), profile)
    plan_path = tmp_path / "plan.json"
    # Runs main() in a fresh interpreter and reports whether torch was imported.
    code = ("import sys; from asam_tune.cli.main import main; "
            f"rc = main(['plan', {str(profile)!r}, '-b', '64', '--allow-other-machine', '-o', {str(plan_path)!r}, "
            "'--format', 'none']); "
            f"rc |= main(['show', {str(plan_path)!r}]); print('TORCH', 'torch' in sys.modules); sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "TORCH False" in result.stdout
    plan = load_record(Plan, plan_path)
    assert plan.batch_size == 64 and plan.workload.name == "mnist1d-cnn"
    shown = json.loads(cli("show", str(plan_path), "--format", "json").stdout)
    assert shown["perturbation_batch_size"] == plan.perturbation_batch_size


def test_plan_refuses_a_profile_from_another_machine_unless_allowed(tmp_path):
    profile = tmp_path / "profile.json"
    dump_record(small_profile(), profile)  # its CPU model is "Test CPU"
    one_line_error(cli("plan", str(profile), "-b", "64", "-o", str(tmp_path / "plan.json")),
                   "another machine", "--allow-other-machine")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_profile_plan_train_end_to_end(tmp_path):
    # One thread count: the main device (cpu/1t) and, beside it, a CPU worker (handover and
    # contention measured). The profiler's full quick layout, every thread count included, is
    # tested in process by tests/cpu/test_profiler_cpu.py; here the subject is the stages chained
    # through the command line.
    profile, plan = tmp_path / "profile.json", tmp_path / "plan.json"
    result = cli("profile", "--workload", "mnist1d-cnn", "--quick", "--cpu-threads", "1", "--batch-sizes", "8,32",
                 "-o", str(profile), "--format", "json", timeout=240)
    assert result.returncode == 0, result.stderr
    loaded = load_record(Profile, profile)
    assert json.loads(result.stdout)["workload"]["name"] == "mnist1d-cnn" == loaded.workload.name
    assert [d.config.key for d in loaded.devices] == ["cpu/1t"]  # --cpu-threads reached the profiler
    assert loaded.handovers and loaded.contention
    result = cli("plan", str(profile), "-b", "32", "--asynchronous", "-o", str(plan), "--format", "none")
    assert result.returncode == 0, result.stderr
    results = tmp_path / "results.json"
    result = cli("train", "--workload", "mnist1d-cnn", "--plan", str(plan), "--epochs", "1", "--format", "json",
                 "-o", str(results), timeout=240)
    assert result.returncode == 0, result.stderr
    rows = {row["method"]: row for row in json.loads(result.stdout)}
    assert json.loads(results.read_text())["results"] == json.loads(result.stdout)
    assert set(rows) == {"sgd", "sam", "asam"}
    assert all(0.1 < row["test_accuracy"] <= 1 for row in rows.values())
    assert rows["asam"]["worker"]["staleness_histogram"].get("1", rows["asam"]["worker"]["staleness_histogram"].get(1))
