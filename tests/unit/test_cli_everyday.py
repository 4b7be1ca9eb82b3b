"""What the commands print and keep, in-process with the slow parts replaced by fakes: train's
label noise, results file, next step and interrupt; profile's kept measurement; tune's empty
study and its baseline check; show's legend."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest

from asam_tune import api
from asam_tune.bench import training
from asam_tune.cli.main import main
from asam_tune.cli.render import PLAN_LEGEND, PROFILE_LEGEND
from asam_tune.profiler import run as profiler_run
from asam_tune.records import Profile, dump_record, load_record
from asam_tune.records import base as record_base
from asam_tune.tune import trial as tune_trial
from asam_tune.tune.selection import Measurement
from asam_tune.tune.study import Baseline
from tests.record_factories import small_profile


@pytest.fixture(autouse=True)
def _quiet_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the fixture records were made on a 'Test CPU'
        yield


# ----------------------------------------------------------------------------- train

def _fake_training(monkeypatch, interrupt_at: str | None = None):
    trained = []

    def train(config, *, plan=None, progress=lambda done, total: None):
        if config.method == interrupt_at:
            raise KeyboardInterrupt
        progress(1, 1)
        trained.append(config)
        return {"method": config.method, "label_noise": config.label_noise, "test_accuracy": 0.8,
                "train_accuracy": 0.7, "train_time_s": 1.0, "step_time_median_s": 0.001, "steps": 40,
                "perturbation_batch_size": None if config.method == "sgd" else 50,
                "worker": None if config.method == "sgd" else {"staleness_histogram": {"0": 1, "1": 39}}}

    monkeypatch.setattr(training, "train_mnist1d", train)
    return trained


def test_train_shows_the_label_noise_saves_its_results_and_says_what_next(tmp_path, monkeypatch, capsys):
    trained = _fake_training(monkeypatch)
    output = tmp_path / "out" / "results.json"
    assert main(["train", "--epochs", "1", "--label-noise", "0.2", "-o", str(output)]) == 0
    out, err = capsys.readouterr()
    assert "20% of the training labels flipped" in err and "test accuracy is what counts" in err
    assert "20% of training labels flipped" in out  # in the table's title too
    assert "Legend:" in out and "staleness k:n" in out
    assert err.strip().splitlines()[-1].startswith("next: ")
    saved = json.loads(output.read_text())
    assert saved["finished"] is True and saved["label_noise"] == 0.2
    assert [r["method"] for r in saved["results"]] == ["sgd", "sam", "asam"] == [c.method for c in trained]
    assert saved["commit"] is not None or "commit" in saved  # provenance stamped


def test_an_interrupted_train_prints_and_saves_what_finished(tmp_path, monkeypatch, capsys):
    _fake_training(monkeypatch, interrupt_at="asam")
    output = tmp_path / "results.json"
    assert main(["train", "--epochs", "1", "-o", str(output)]) == 130
    out, err = capsys.readouterr()
    assert "interrupted; finished: sgd, sam" in err
    assert "│ sgd" in out and "│ sam" in out and "│ asam" not in out
    saved = json.loads(output.read_text())
    assert saved["finished"] is False and [r["method"] for r in saved["results"]] == ["sgd", "sam"]


def test_train_checks_its_output_before_training(tmp_path, monkeypatch, capsys):
    trained = _fake_training(monkeypatch)
    assert main(["train", "-o", str(tmp_path)]) == 2  # a directory
    assert trained == [] and "cannot write" in capsys.readouterr().err


# ----------------------------------------------------------------------------- profile

def test_a_profile_whose_final_write_fails_is_kept_in_a_named_temporary_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(profiler_run, "run_profile", lambda *args, **kwargs: small_profile())
    target = tmp_path / "profile.json"
    real_replace = os.replace

    def disk_full(source, destination):
        if Path(destination) == target:
            raise OSError(28, "No space left on device")
        return real_replace(source, destination)

    monkeypatch.setattr(record_base.os, "replace", disk_full)
    assert main(["profile", "--devices", "cpu", "--quick", "-o", str(target), "--format", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "the profile is kept in " in err[0]
    kept = err[0].split("is kept in ")[1].split(":")[0]
    try:
        assert load_record(Profile, kept) == small_profile()
    finally:
        os.unlink(kept)


def test_profile_and_plan_say_what_next(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(profiler_run, "run_profile", lambda *args, **kwargs: small_profile())
    profile, plan = tmp_path / "profile.json", tmp_path / "plan.json"
    assert main(["profile", "--devices", "cpu", "--quick", "-o", str(profile), "--format", "none"]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"next: asam-tune plan {profile} --batch-size B -o plan.json   (B: your training batch size)")
    assert main(["plan", str(profile), "-b", "64", "--allow-other-machine", "-o", str(plan), "--format", "none"]) == 0
    assert f"next: asam-tune train --plan {plan}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- show

def test_show_ends_with_a_legend_and_explains_the_mode(tmp_path, capsys):
    dump_record(small_profile(), tmp_path / "profile.json")
    plan = api.plan_for(small_profile(), 64, asynchronous=True)
    dump_record(plan, tmp_path / "plan.json")
    assert main(["show", str(tmp_path / "profile.json")]) == 0
    assert PROFILE_LEGEND.split(".")[0] in " ".join(capsys.readouterr().out.split())
    assert main(["show", str(tmp_path / "plan.json")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert PLAN_LEGEND.split(";")[0] in out
    assert "asynchronous, staleness 1" in out and "staleness1 (staleness 1)" not in out


# ----------------------------------------------------------------------------- tune

class _FakeRunner:
    """Stands in for WorkloadTrialRunner: a baseline (or a failure) and trials that hide."""

    baseline_s = 0.010
    fail = False

    def __init__(self, workload, plan, space, usable, **kwargs):
        self.space = space

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def baseline(self) -> Baseline:
        if self.fail:
            raise RuntimeError("the worker could not start")
        return Baseline(self.baseline_s, 2 * self.baseline_s, "fake cores")

    def run(self, config) -> Measurement:
        return Measurement(self.baseline_s * 1.01, 0.0, 0.0, self.baseline_s / 2, 10)


def _tune(tmp_path, monkeypatch, runner) -> int:
    monkeypatch.setattr(tune_trial, "WorkloadTrialRunner", runner)
    dump_record(api.plan_for(small_profile(), 8), tmp_path / "plan.json")
    return main(["tune", "--plan", str(tmp_path / "plan.json"), "--trials", "2", "--confirm-rounds", "0",
                 "--allow-other-machine", "-o", str(tmp_path / "tuned.json"), "--format", "json"])


def test_a_failed_first_tune_leaves_no_empty_study(tmp_path, monkeypatch, capsys):
    runner = type("Failing", (_FakeRunner,), {"fail": True})
    assert _tune(tmp_path, monkeypatch, runner) == 2
    assert "the worker could not start" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_a_tune_with_trials_keeps_its_study(tmp_path, monkeypatch, capsys):
    assert _tune(tmp_path, monkeypatch, _FakeRunner) in (0, 1)
    assert (tmp_path / "tuned.study.db").stat().st_size > 0
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("next: ")


def test_tune_warns_when_its_baseline_is_far_from_the_profiles(tmp_path, monkeypatch, capsys):
    plan = api.plan_for(small_profile(), 8)
    slow = type("Slow", (_FakeRunner,), {"baseline_s": 120 * plan.predictions.sgd_step_s})
    _tune(tmp_path, monkeypatch, slow)
    err = capsys.readouterr().err
    assert "asam-tune: warning: SGD's step measured" in err and "(120.00x)" in err and "busier" in err
    capsys.readouterr()
    quiet = type("Quiet", (_FakeRunner,), {"baseline_s": plan.predictions.sgd_step_s * 1.5})
    for name in ("tuned.json", "tuned.tuning.json", "tuned.study.db"):
        (tmp_path / name).unlink(missing_ok=True)
    _tune(tmp_path, monkeypatch, quiet)
    assert "SGD's step measured" not in capsys.readouterr().err


def test_profile_ascent_dtype_reaches_the_profiler_and_a_bad_one_is_one_line_before_measuring(tmp_path, monkeypatch,
                                                                                               capsys):
    seen = []

    def fake_run_profile(*args, **kwargs):
        seen.append(kwargs["ascent_dtype"])
        return small_profile()

    monkeypatch.setattr(profiler_run, "run_profile", fake_run_profile)
    target = tmp_path / "profile.json"
    assert main(["profile", "--devices", "cpu", "--quick", "--ascent-dtype", "fp8", "-o", str(target),
                 "--format", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown ascent dtype 'fp8'" in err[0] and seen == [] and not target.exists()
    assert main(["profile", "--devices", "cpu", "--quick", "--ascent-dtype", "bf16", "-o", str(target),
                 "--format", "none"]) == 0
    assert seen == ["bfloat16"]
