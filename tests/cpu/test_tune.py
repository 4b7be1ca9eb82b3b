"""``asam-tune tune`` end to end on the CPU: real worker processes, the tiny MNIST-1D CNN, a
stored study that resumes. No timing threshold: whether a trial hid the perturbation depends
on the machine's load, so the test checks the bookkeeping that must hold either way."""
from __future__ import annotations

import argparse
import json
import os
import warnings

import psutil
import pytest

from asam_tune import api
from asam_tune.records import Plan, dump_record, load_record
from asam_tune.records.tuning import Tuning
from asam_tune.tune.cli import add_tune_parser, run_tune

pytestmark = [pytest.mark.process, pytest.mark.slow, pytest.mark.timeout(240)]


def _tune(plan_path, output, trials: int) -> int:
    parser = argparse.ArgumentParser()
    add_tune_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tune", "--plan", str(plan_path), "--trials", str(trials), "--steps-per-trial", "4",
                              "--warmup-steps", "1", "--output", str(output), "--allow-other-machine",
                              "--format", "json"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the fixture plan was made on a 'Test CPU'
        return run_tune(args)


def _workers() -> list[psutil.Process]:
    """Child processes other than multiprocessing's resource tracker (it lives as long as we do)."""
    return [c for c in psutil.Process().children(recursive=True)
            if not any("resource_tracker" in part for part in c.cmdline())]


def _check_outputs(rc: int, output, record: Tuning) -> None:
    chosen = record.trial(record.chosen_trial)
    if chosen is None:
        assert rc == 1 and not output.exists()
        return
    assert rc == 0
    tuned = load_record(Plan, output)
    assert tuned.content_hash() == record.tuned_plan_hash
    assert (tuned.perturbation_batch_size, tuned.perturbation.threads) == \
        (chosen.perturbation_batch_size, chosen.worker_threads)
    assert tuned.predictions.asam_step_s == chosen.step_time_s and chosen.hidden


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 usable cores for a main process and a worker")
def test_tune_runs_real_trials_records_them_and_resumes(tmp_path, capsys):
    from tests.record_factories import small_profile

    plan = api.plan_for(small_profile(), 32)  # main cpu/1t, worker cpu/1t
    dump_record(plan, tmp_path / "plan.json")
    output = tmp_path / "tuned.json"
    affinity = os.sched_getaffinity(0)

    rc = _tune(tmp_path / "plan.json", output, trials=3)
    printed = json.loads(capsys.readouterr().out)
    record = load_record(Tuning, tmp_path / "tuned.tuning.json")
    assert printed == record.model_dump(mode="json")
    assert [t.number for t in record.trials] == [0, 1, 2]
    first = record.trials[0]
    assert first.from_cost_model and first.perturbation_batch_size == plan.perturbation_batch_size
    assert (first.main_threads, first.worker_threads) == (1, 1)
    for trial in record.trials:
        assert trial.state == "complete", trial.error
        assert trial.step_time_s > 0 and trial.worker_time_s > 0 and trial.wait_s >= 0
    assert record.baseline.sgd_step_s > 0 and record.baseline.sam_step_s > 0
    assert record.storage == f"sqlite:///{tmp_path / 'tuned.study.db'}"
    _check_outputs(rc, output, record)
    # The trials pinned this process; the runner put it back, and no worker outlives its trial.
    assert os.sched_getaffinity(0) == affinity
    assert not _workers()

    rc = _tune(tmp_path / "plan.json", output, trials=1)
    capsys.readouterr()
    resumed = load_record(Tuning, tmp_path / "tuned.tuning.json")
    assert [t.number for t in resumed.trials] == [0, 1, 2, 3]
    assert resumed.trials[:3] == tuple(t.model_copy(update={"pareto": r.pareto}) for t, r in
                                       zip(record.trials, resumed.trials[:3]))
    assert resumed.baseline == record.baseline  # measured once per study
    assert [t.number for t in resumed.trials if t.from_cost_model] == [0]
    _check_outputs(rc, output, resumed)
