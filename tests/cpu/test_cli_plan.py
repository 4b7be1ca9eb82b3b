"""``asam-tune plan`` with the quality floor and the rho rule, its refusals, and ``show --plot``,
through a subprocess (exit codes and one-line errors)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from asam_tune.records import MachineLoad, Plan, dump_record, load_record
from tests.cpu.test_cli import cli, one_line_error
from tests.fixtures.costmodel_profiles import contention, gpu_with_cpu, profile

PROFILES = Path(__file__).resolve().parents[2] / "profiles"
BUSY = MachineLoad(start=(3.0, 2.5, 1.0), end=(3.1, 2.6, 1.1), usable_cores=2, elapsed_s=30.0,
                   profiler_busy_cores=1.0)


def _write(tmp_path: Path, profile, name: str = "profile.json") -> Path:
    dump_record(profile, tmp_path / name)
    return tmp_path / name


def test_plan_shows_the_trade_and_writes_the_floor(tmp_path):
    # A floor above what hides (cpu/4t hides b_p = 17), so that the trade has two rows.
    result = cli("plan", str(_write(tmp_path, gpu_with_cpu())), "-b", "100", "--allow-other-machine",
                 "--min-perturbation-fraction", "0.25", "-o", str(tmp_path / "plan.json"))
    assert result.returncode == 0, result.stderr
    for expected in ("Hiding the ascent or keeping SAM's gain", "hides fully", "keeps the gain", "synchronous SAM",
                     "forces partial hiding", "quality floor", "b_p >= 25 of 100"):
        assert expected in result.stdout, expected
    plan = load_record(Plan, tmp_path / "plan.json")
    assert (plan.perturbation_batch_size, plan.hiding, plan.rho_rule.kind) == (25, "partial", "power")


def test_floor_and_rule_flags(tmp_path):
    profile = _write(tmp_path, gpu_with_cpu())
    out = tmp_path / "plan.json"
    result = cli("plan", str(profile), "-b", "100", "--allow-other-machine", "--min-perturbation-fraction", "0.1",
                 "--rho-rule", "none", "-o", str(out), "--format", "json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["quality"]["min_perturbation_fraction"] == 0.1 and shown["rho_rule"]["kind"] == "none"
    assert shown["perturbation_batch_size"] == 17 and shown["hiding"] == "full"


@pytest.mark.parametrize("args, needles", [
    (("--min-perturbation-fraction", "0"), ("--min-perturbation-fraction", "(0, 1]", "'0'")),
    (("--min-perturbation-fraction", "1.5"), ("--min-perturbation-fraction", "'1.5'")),
    (("--min-perturbation-fraction", "nan"), ("--min-perturbation-fraction", "'nan'")),
    (("--rho-rule", "linear"), ("--rho-rule", "'linear'")),
])
def test_bad_floor_and_rule_flags_are_one_line_errors(tmp_path, args, needles):
    one_line_error(cli("plan", str(_write(tmp_path, gpu_with_cpu())), "-b", "100", *args,
                       "-o", str(tmp_path / "plan.json")), *needles)
    assert not (tmp_path / "plan.json").exists()


def _impossible():
    """cuda:0 measured twice as fast while the CPU worker computes: the main step beats SGD."""
    return profile(*gpu_with_cpu().devices, contention=[contention("cuda:0", "cpu/4t", 0.5)])


def test_impossible_results_from_a_busy_profile_are_refused(tmp_path):
    busy = _impossible().model_copy(update={"machine_load": BUSY})
    result = cli("plan", str(_write(tmp_path, busy)), "-b", "100", "--min-perturbation-fraction", "0.05",
                 "--allow-other-machine", "-o", str(tmp_path / "plan.json"))
    one_line_error(result, "impossible prediction", "faster than SGD", "busy machine")
    assert not (tmp_path / "plan.json").exists()


def test_impossible_results_from_an_idle_profile_are_a_warning_line(tmp_path):
    result = cli("plan", str(_write(tmp_path, _impossible())), "-b", "100", "--min-perturbation-fraction", "0.05",
                 "--allow-other-machine", "-o", str(tmp_path / "plan.json"), "--format", "none")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("asam-tune: warning: impossible")]
    assert len(warnings) == 1 and "faster than SGD" in warnings[0]
    assert any(n.startswith("impossible") for n in load_record(Plan, tmp_path / "plan.json").notes)


def test_a_busy_profile_is_said_in_the_output(tmp_path):
    busy = gpu_with_cpu().model_copy(update={"machine_load": BUSY.model_copy(update={"start": (6.0, 5.0, 4.0),
                                                                                   "usable_cores": 8})})
    result = cli("plan", str(_write(tmp_path, busy)), "-b", "100", "--allow-other-machine",
                 "-o", str(tmp_path / "plan.json"))
    assert result.returncode == 0, result.stderr
    assert "profile load" in result.stdout and "BUSY" in result.stdout
    assert any(line.startswith("asam-tune: warning: the profile was measured on a busy machine")
               for line in result.stderr.splitlines())


def test_show_plots_a_profile_with_a_plan_marked(tmp_path):
    profile = PROFILES / "synthetic-gpu30x-resnet20.json"
    plan = tmp_path / "plan.json"
    assert cli("plan", str(profile), "-b", "128", "--min-perturbation-fraction", "0.06", "--allow-other-machine",
               "-o", str(plan), "--format", "none").returncode == 0
    result = cli("show", str(profile), "--plot", str(tmp_path / "curves.png"), "--plan", str(plan))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    one_line_error(cli("show", str(plan), "--plot", str(tmp_path / "x.png")), "not a profile")
    one_line_error(cli("show", str(profile), "--plan", str(plan)), "--plan goes with --plot")
    assert not (tmp_path / "x.png").exists()


def test_show_a_version_1_plan_has_no_trade_and_no_rule():
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "plan_v1.json"
    result = cli("show", str(fixture))
    assert result.returncode == 0, result.stderr
    assert "none: rho is the same at every b_p" in result.stdout
    assert "Hiding the ascent" not in result.stdout and "quality floor" not in result.stdout
