"""``asam-tune tune`` without torch: search space, constraint, selection, the study with a fake
trial runner, the records it writes and their tables."""
from __future__ import annotations

import argparse
import io
import json
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
from rich.console import Console

from asam_tune import api
from asam_tune.errors import RecordError, UserInputError, WorkerError
from asam_tune.records import Plan, dump_record, load_record
from asam_tune.records.base import parse_record
from asam_tune.records.tuning import ConfirmationLog, Tuning
from asam_tune.cli.tune import add_arguments as add_tune_arguments
from asam_tune.cli.tune import default_storage, tuning_record_path
from asam_tune.cli.tune import run as run_tune
from asam_tune.tune.confirm import finalists, pool
from asam_tune.tune.render import render_tuning
from asam_tune.tune.result import tuned_plan, tuning_record
from asam_tune.tune.selection import Measurement, Outcome, choose, is_hidden, pareto_front, wait_excess_s
from asam_tune.tune.space import SearchSpace, TrialConfig
from asam_tune.tune.study import Baseline, StudyResult, run_study
from asam_tune.tune.window import TrialLength, timed_batches
from tests.fixtures.costmodel_profiles import affine, cpu_only_profile, gpu_with_cpu, profile
from tests.record_factories import small_profile

MARGIN = 0.05


def brute_force() -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.BruteForceSampler(seed=0)


def cpu_plan(batch_size: int = 4) -> Plan:
    return api.plan_for(small_profile(), batch_size)


# ----------------------------------------------------------------------------- search space

def test_cpu_only_space_splits_the_cores_and_starts_from_the_plan():
    plan = api.plan_for(cpu_only_profile(), 128)  # main cpu/4t, worker cpu/4t on 8 cores, b_p 121
    space = SearchSpace.from_plan(plan, usable_cores=8)
    assert (space.main_device, space.perturbations, space.core_budget) == ("cpu", ("cpu",), 8)
    assert space.planned_config(plan) == TrialConfig("cpu", main_threads=4, worker_threads=4,
                                                     perturbation_batch_size=121)
    # On a smaller machine the plan's threads are cut to fit: 4 main threads leave 2 for the worker.
    assert SearchSpace.from_plan(plan, usable_cores=6).planned_config(plan) == TrialConfig("cpu", 4, 2, 121)


def test_accelerator_space_offers_the_plans_devices_and_the_cpu():
    two_gpus = profile(affine("cuda:0", 0.01, 0.0001), affine("cuda:1", 0.01, 0.0001),
                       affine("cpu/1t", 0.002, 0.004), affine("cpu/2t", 0.002, 0.002))
    plan = api.plan_for(two_gpus, 128)  # main cuda:0, ascent on cuda:1, alternatives on the CPU
    space = SearchSpace.from_plan(plan, usable_cores=8)
    assert (space.main_device, space.perturbations, space.core_budget) == ("cuda:0", ("cuda:1", "cpu"), 8)
    assert space.planned_config(plan) == TrialConfig("cuda:1", None, None, plan.perturbation_batch_size)
    # One core drives the GPU and nothing is left for a CPU worker: the CPU is not offered.
    assert SearchSpace.from_plan(plan, usable_cores=1).perturbations == ("cuda:1",)


def test_reserved_cores_and_several_ranks():
    plan = api.plan_for(gpu_with_cpu(), 128, reserved_cores=2)
    assert SearchSpace.from_plan(plan, usable_cores=8).core_budget == 6
    with pytest.raises(UserInputError, match="nproc_per_node 2"):
        SearchSpace.from_plan(api.plan_for(gpu_with_cpu(), 128, nproc_per_node=2), usable_cores=8)
    with pytest.raises(UserInputError, match="nothing to tune: 1 usable core"):
        SearchSpace.from_plan(cpu_plan(), usable_cores=1)


def test_a_synchronous_plan_starts_from_its_best_alternative():
    plan = cpu_plan().model_copy(update={"mode": "synchronous", "staleness": 0})
    alternative = plan.model_copy(update={"perturbation_batch_size": 3})  # as an Alternative below
    from asam_tune.records.plan import Alternative

    alt = Alternative(main_device="cpu/1t", perturbation=alternative.perturbation, perturbation_batch_size=3,
                      mode="staleness1", staleness=1, feasible=True, predictions=plan.predictions)
    plan = plan.model_copy(update={"alternatives": (alt,)})
    assert SearchSpace.from_plan(plan, 2).planned_config(plan) == TrialConfig("cpu", 1, 1, 3)


@pytest.mark.parametrize("config", [
    TrialConfig("cpu", 3, 2, 16), TrialConfig("cpu", 7, 1, 1), TrialConfig("cpu", 1, 7, 128)])
def test_suggest_returns_what_the_parameters_say(config):
    space = SearchSpace(batch_size=128, main_device="cpu", perturbations=("cpu",), core_budget=8)
    assert space.suggest(optuna.trial.FixedTrial(config.params())) == config


def test_suggest_asks_threads_only_for_a_cpu_worker():
    space = SearchSpace(batch_size=64, main_device="cuda:0", perturbations=("cuda:1", "cuda:0+stream", "cpu"),
                        core_budget=4)
    assert space.suggest(optuna.trial.FixedTrial({"perturbation": "cuda:0+stream", "perturbation_batch_size": 8})) \
        == TrialConfig("cuda:0+stream", None, None, 8)
    assert TrialConfig("cuda:0+stream", None, None, 8).worker_device == "cuda:0"
    assert space.suggest(optuna.trial.FixedTrial(
        {"perturbation": "cpu", "worker_threads": 3, "perturbation_batch_size": 64})) == TrialConfig("cpu", None, 3, 64)


def test_placement_follows_the_planner():
    cpu = SearchSpace(batch_size=64, main_device="cpu", perturbations=("cpu",), core_budget=6)
    assert cpu.placement(TrialConfig("cpu", 2, 3, 8), (0, 1, 2, 3, 4, 5, 6, 7), reserved_cores=2) == \
        ((0, 1), (4, 5, 6))
    assert cpu.baseline_cores((0, 1, 2, 3, 4, 5, 6, 7)) == (0, 1, 2, 3, 4, 5)
    gpu = SearchSpace(batch_size=64, main_device="cuda:0", perturbations=("cpu",), core_budget=8)
    # Nearest the GPU first, as the planner pins its worker: main on 6, worker on 7, 0.
    assert gpu.placement(TrialConfig("cpu", None, 2, 8), tuple(range(8)), nearest_cores=(6, 7)) == ((6,), (7, 0))
    assert gpu.placement(TrialConfig("cuda:0+stream", None, None, 8), tuple(range(8))) == ((0,), None)
    with pytest.raises(UserInputError, match="needs 5 cores"):
        cpu.placement(TrialConfig("cpu", 2, 3, 8), (0, 1, 2, 3))


# ----------------------------------------------------------------------------- selection

def outcome(number: int, b_p: int, step: float, wait: float, *, state: str = "complete") -> Outcome:
    return Outcome(number, state, TrialConfig("cpu", 1, 1, b_p), Measurement(step, 0.0, wait, step / 2, 10))


def test_constraint_is_the_wait_beyond_the_margin():
    m = Measurement(step_time_s=0.010, step_time_iqr_s=0.0, wait_s=0.0004, worker_time_s=0.008, steps=10)
    assert wait_excess_s(m, 0.05) == pytest.approx(-0.0001) and is_hidden(m, 0.05)
    assert not is_hidden(m, 0.03)


def test_choice_is_the_largest_hidden_b_p_within_the_margin_of_sgd():
    sgd = 0.010
    outcomes = [
        outcome(0, 32, 0.0104, 0.0001),  # hidden, within 5% of SGD
        outcome(1, 64, 0.0104, 0.0020),  # within but late: not hidden
        outcome(2, 48, 0.0110, 0.0001),  # hidden, 10% slower than SGD
        outcome(3, 40, 0.0105, 0.0002),  # hidden, within: the largest such b_p
        outcome(4, 40, 0.0101, 0.0002),  # same b_p, faster: wins the tie
        Outcome(5, "fail", TrialConfig("cpu", 1, 1, 128), error="RuntimeError: CUDA out of memory"),
    ]
    choice = choose(outcomes, sgd, MARGIN)
    assert choice.outcome.number == 4 and choice.within_margin
    # Front over hidden trials (b_p up, step down): 4 dominates 0 and 3; 2 has the larger b_p.
    assert [o.number for o in pareto_front(outcomes, MARGIN)] == [4, 2]


def test_without_a_trial_within_the_margin_the_largest_b_p_near_the_fastest_hidden_step_is_chosen():
    outcomes = [outcome(0, 8, 0.020, 0.0001), outcome(1, 16, 0.015, 0.0001), outcome(2, 32, 0.012, 0.005)]
    choice = choose(outcomes, 0.010, MARGIN)
    assert choice.outcome.number == 1 and not choice.within_margin
    assert choice.reason.endswith("the largest b_p within 5% of the fastest hidden step (15 ms)")
    # Measured on the 2-vCPU VM (resnet20, B=128, SGD on both cores 297 ms): every step is the
    # main step's floor give or take noise; b_p 121 is within 5% of the fastest (b_p 6) and wins.
    floor = [outcome(0, 121, 0.5393, 0.00077), outcome(1, 11, 0.5378, 0.00057), outcome(2, 6, 0.5200, 0.0006),
             outcome(3, 18, 0.5766, 0.00063), outcome(4, 105, 0.5343, 0.00074), outcome(5, 126, 0.5500, 0.00075)]
    choice = choose(floor, 0.2972, MARGIN)
    assert choice.outcome.number == 0 and not choice.within_margin  # 0.5500 > 1.05 * 0.5200: 126 is out
    nothing = choose([outcomes[2], Outcome(3, "fail", None, error="x")], 0.010, MARGIN)
    assert nothing.outcome is None and nothing.reason == "no trial hid the perturbation (1 completed, 1 failed)"


def test_pareto_front_agrees_with_optunas():
    """Optuna's best_trials (feasible Pareto front) is the reference implementation."""
    rows = [(8, 0.010, 0.0001), (16, 0.011, 0.0001), (16, 0.012, 0.0001), (32, 0.013, 0.0001), (64, 0.013, 0.003),
            (4, 0.0095, 0.0001), (24, 0.0105, 0.0004), (24, 0.0105, 0.0007), (2, 0.0096, 0.0)]
    outcomes = [outcome(i, b, s, w) for i, (b, s, w) in enumerate(rows)]
    study = optuna.create_study(directions=["minimize", "maximize"])
    for o in outcomes:
        m = o.measurement
        study.add_trial(optuna.trial.create_trial(
            params={"b": o.config.perturbation_batch_size},
            distributions={"b": optuna.distributions.IntDistribution(1, 64)},
            values=[m.step_time_s, o.config.perturbation_batch_size],
            system_attrs={"constraints:wait_excess_s": wait_excess_s(m, MARGIN)}))
    assert sorted(t.number for t in study.best_trials) == sorted(o.number for o in pareto_front(outcomes, MARGIN))


# ----------------------------------------------------------------------------- the study

@dataclass
class FakeRunner:
    """A machine where the main step takes 10 ms, the worker 1 ms + 2 ms per sample and the
    hand-over 0.1 ms; b_p above ``fails_from`` runs out of memory, b_p in ``dies`` kills the worker."""

    sgd_s: float = 0.010
    fails_from: int | None = None
    dies: tuple[int, ...] = ()
    baselines: int = 0
    ran: list[TrialConfig] = field(default_factory=list)

    def baseline(self) -> Baseline:
        self.baselines += 1
        return Baseline(self.sgd_s, 2 * self.sgd_s, "fake cores 0,1")

    def run(self, config: TrialConfig) -> Measurement:
        self.ran.append(config)
        b = config.perturbation_batch_size
        if self.fails_from is not None and b >= self.fails_from:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")
        if b in self.dies:
            raise WorkerError(f"perturbation worker died (pid 4242, signal 9) at b_p={b}")
        worker = 0.001 + 0.002 * b
        wait = 0.0001 + max(0.0, worker - 0.010)
        return Measurement(0.010 + wait, 0.0001, wait, worker, 10)


def test_study_enumerating_the_space_chooses_exactly_the_largest_hidden_b_p():
    # B = 6: b_p 1..4 keep the worker within 10 ms (wait 0.1 ms <= 5%); 5 and 6 are late.
    plan = cpu_plan(6)
    space = SearchSpace.from_plan(plan, usable_cores=2)
    runner = FakeRunner()
    seen = []
    result = run_study(space, runner, margin=MARGIN, n_trials=10, planned=TrialConfig("cpu", 1, 1, 2),
                       sampler=brute_force(), on_trial=seen.append)
    assert runner.ran[0] == TrialConfig("cpu", 1, 1, 2)  # the cost model's choice comes first
    assert sorted(c.perturbation_batch_size for c in runner.ran[:6]) == [1, 2, 3, 4, 5, 6]
    # Then the finalists again (by default two rounds): the choice, b_p 4, and the cost model's, b_p 2.
    assert [c.perturbation_batch_size for c in runner.ran[6:]] == [4, 2, 4, 2]
    assert result.planned_trial == 0 and result.outcomes[0].from_cost_model
    assert [o.number for o in seen] == [0, 1, 2, 3, 4, 5]
    assert result.choice.outcome.config == TrialConfig("cpu", 1, 1, 4) and result.choice.within_margin
    assert [o.config.perturbation_batch_size for o in result.front] == [4]  # all hidden steps are equal
    assert runner.baselines == 1


def test_failed_trials_are_recorded_and_the_study_goes_on():
    plan = cpu_plan(6)
    space = SearchSpace.from_plan(plan, usable_cores=2)
    runner = FakeRunner(fails_from=6, dies=(2,))
    result = run_study(space, runner, margin=MARGIN, n_trials=10, sampler=brute_force())
    states = {o.config.perturbation_batch_size: (o.state, o.error) for o in result.outcomes}
    assert states[6] == ("fail", "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert states[2] == ("fail", "WorkerError: perturbation worker died (pid 4242, signal 9) at b_p=2")
    assert states[3] == ("complete", None) and len(result.outcomes) == 6
    assert result.choice.outcome.config.perturbation_batch_size == 4

    tuned = tuned_plan(plan, space, result, margin=MARGIN, usable_core_ids=(0, 1))
    record = tuning_record(plan, tuned, result, margin=MARGIN, steps=10, warmup=2)
    logged = {t.perturbation_batch_size: t for t in record.trials}
    assert logged[6].state == "fail" and logged[6].error.startswith("RuntimeError: CUDA out of memory")
    assert logged[6].step_time_s is None and logged[2].state == "fail"
    assert logged[4].hidden and logged[4].within_margin and logged[5].hidden is False
    assert record.chosen_trial == logged[4].number


def test_a_stored_study_resumes_with_its_trials_and_baseline(tmp_path):
    plan = cpu_plan(32)
    space = SearchSpace.from_plan(plan, usable_cores=2)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    identity = {"workload": "mnist1d-cnn", "batch_size": 32}
    first = FakeRunner()
    one = run_study(space, first, margin=MARGIN, n_trials=3, storage=storage, seed=1,
                    planned=space.planned_config(plan), identity=identity)
    assert (one.new_trials, len(one.outcomes), first.baselines) == (3, 3, 1)

    again = FakeRunner(sgd_s=0.5)  # a different baseline would be measured: it must not be
    two = run_study(space, again, margin=MARGIN, n_trials=2, storage=storage, seed=2,
                    planned=space.planned_config(plan), identity=identity)
    assert (two.new_trials, len(two.outcomes), again.baselines) == (2, 5, 0)
    assert two.baseline == one.baseline
    assert [o.number for o in two.outcomes if o.from_cost_model] == [0]  # enqueued once per study
    assert [o.number for o in two.outcomes[:3]] == [o.number for o in one.outcomes]

    with pytest.raises(UserInputError, match="batch_size: stored 32, now 64"):
        run_study(space, FakeRunner(), margin=MARGIN, n_trials=1, storage=storage,
                  identity={"workload": "mnist1d-cnn", "batch_size": 64})
    with pytest.raises(UserInputError, match="margin: stored 0.05, now 0.1"):
        run_study(space, FakeRunner(), margin=0.1, n_trials=1, storage=storage, identity=identity)


# ----------------------------------------------------------------------------- trial length and confirmation

def _rendered(record: Tuning) -> str:
    console = Console(file=io.StringIO(), width=250)
    for table in render_tuning(record):
        console.print(table)
    return console.file.getvalue()


@dataclass
class NoisyRunner:
    """Every b_p up to 5 hides the worker in a 10.1 ms step (SGD: 10 ms); b_p 6 is late. The
    first window of each b_p in ``noisy`` reads 11 ms (a slow spell: 10% off, twice the
    margin), later windows the truth. ``dies_on``: (b_p, window) pairs whose worker dies."""

    noisy: tuple[int, ...] = (5,)
    dies_on: tuple[tuple[int, int], ...] = ()
    late_after_trial: tuple[int, ...] = ()  # b_p whose later windows find the worker late
    ran: list[TrialConfig] = field(default_factory=list)

    def baseline(self) -> Baseline:
        return Baseline(0.010, 0.020, "fake cores 0,1")

    def run(self, config: TrialConfig) -> Measurement:
        self.ran.append(config)
        b = config.perturbation_batch_size
        window = sum(c == config for c in self.ran)  # 1: the trial, 2...: its confirmation
        if (b, window) in self.dies_on:
            raise WorkerError(f"perturbation worker died (pid 4242, signal 9) at b_p={b}\ntraceback")
        if b == 6 or (b in self.late_after_trial and window > 1):
            return Measurement(0.0130, 0.0002, 0.0030, 0.012, 20)
        step = 0.0110 if (b in self.noisy and window == 1) else 0.0101
        return Measurement(step, 0.0001, 0.0001, 0.006, 20)


def _noisy_study(runner: NoisyRunner, rounds: int) -> tuple[Plan, SearchSpace, StudyResult]:
    plan = cpu_plan(6)
    space = SearchSpace.from_plan(plan, usable_cores=2)
    result = run_study(space, runner, margin=MARGIN, n_trials=10, planned=TrialConfig("cpu", 1, 1, 2),
                       sampler=brute_force(), confirm_rounds=rounds)
    return plan, space, result


def _trial_of(result: StudyResult, b_p: int) -> int:
    return next(o.number for o in result.outcomes if o.config.perturbation_batch_size == b_p)


def test_a_noisy_first_window_misleads_the_study_and_its_confirmation_finds_the_truth(tmp_path):
    # Without confirmation, b_p 5's one slow window (11 ms: 1.10x SGD) loses it to b_p 4.
    _, _, single = _noisy_study(NoisyRunner(), rounds=0)
    assert single.choice.outcome.config.perturbation_batch_size == 4 and single.confirmation is None

    runner = NoisyRunner()
    plan, space, result = _noisy_study(runner, rounds=2)
    chosen = result.choice.outcome
    assert chosen.config.perturbation_batch_size == 5 and result.choice.within_margin
    assert chosen.number == _trial_of(result, 5)
    # Pooled: the median of 11.0, 10.1 and 10.1 ms; the steps of the three windows add up.
    assert chosen.measurement == Measurement(0.0101, 0.0001, 0.0001, 0.006, 60)
    confirmation = result.confirmation
    assert confirmation.confirmed and confirmation.changed
    assert confirmation.study_choice.outcome.config.perturbation_batch_size == 4
    assert [(r.finalist.outcome.config.perturbation_batch_size, r.finalist.roles) for r in confirmation.runs] == \
        [(4, ("study_choice",)), (2, ("cost_model",)), (5, ("larger_b_p",))]
    # Confirmation windows are not trials: the study holds its six.
    assert len(result.outcomes) == 6 and result.new_trials == 6

    tuned = tuned_plan(plan, space, result, margin=MARGIN, usable_core_ids=(0, 1))
    assert tuned.perturbation_batch_size == 5 and tuned.predictions.asam_step_s == 0.0101  # pooled, not 11 ms
    assert "60 steps (medians over the trial's window and 2 confirmation window(s))" in tuned.notes[1]
    record = tuning_record(plan, tuned, result, margin=MARGIN, steps=20, warmup=5, min_trial_seconds=3.0,
                           confirm_rounds=2)
    assert record.chosen_trial == _trial_of(result, 5)
    assert record.verdict.endswith(f"; confirmation changed the choice from trial {_trial_of(result, 4)} "
                                   f"(main 1t + cpu/1t, b_p=4)")
    assert "judged on medians pooled over the trial and 2 confirmation round(s) of 3 finalist(s)" in record.verdict
    log = {c.perturbation_batch_size: c for c in record.confirmation}
    assert [r.step_time_s for r in log[5].rounds] == [0.0101, 0.0101]
    assert (log[5].step_time_s, log[5].steps, log[5].hidden, log[5].within_margin) == (0.0101, 60, True, True)
    assert record.trial(log[5].trial).step_time_s == 0.0110  # the trial keeps its own window
    assert (record.min_trial_seconds, record.confirm_rounds) == (3.0, 2)
    dump_record(record, tmp_path / "t.tuning.json")
    assert load_record(Tuning, tmp_path / "t.tuning.json") == record

    text = _rendered(record)
    for expected in ("Confirmation: the finalists measured again in alternation (2 round(s))",
                     "next larger b_p", "study's choice", "11.00", "10.10 / 10.10", "2 round(s) of 3 finalist(s)",
                     "at least 20 timed steps and 3 s of them after 5 warm-up"):
        assert expected in text, expected


def test_finalists_alternate_round_after_round():
    runner = NoisyRunner()
    result = _noisy_study(runner, rounds=3)[2]
    assert [c.perturbation_batch_size for c in runner.ran[6:]] == [4, 2, 5] * 3
    assert [len(r.rounds) for r in result.confirmation.runs] == [3, 3, 3]


def test_a_failing_confirmation_is_recorded_and_its_finalist_dropped():
    # b_p 5's worker dies in its first confirmation window (its second window in all).
    runner = NoisyRunner(dies_on=((5, 2),))
    plan, space, result = _noisy_study(runner, rounds=2)
    assert [c.perturbation_batch_size for c in runner.ran[6:]] == [4, 2, 5, 4, 2]  # not tried again
    failed = result.confirmation.runs[2]
    assert failed.error == "WorkerError: perturbation worker died (pid 4242, signal 9) at b_p=5"
    assert failed.pooled is None and failed.rounds == ()
    assert result.choice.outcome.config.perturbation_batch_size == 4 and not result.confirmation.changed

    tuned = tuned_plan(plan, space, result, margin=MARGIN, usable_core_ids=(0, 1))
    assert 5 not in [a.perturbation_batch_size for a in tuned.alternatives]  # it failed: no alternative
    record = tuning_record(plan, tuned, result, margin=MARGIN, steps=20, warmup=5, confirm_rounds=2)
    assert record.verdict.endswith("; confirmation kept the study's choice")
    dropped = record.confirmation[2]
    assert dropped.error.startswith("WorkerError") and dropped.step_time_s is None and dropped.hidden is None
    assert "dropped: WorkerError: perturbation worker died" in _rendered(record)
    assert "2 round(s) of 3 finalist(s) in alternation, 1 failed" in _rendered(record)


def test_when_no_finalist_is_confirmed_the_studys_choice_stands_and_says_so():
    # Every finalist's worker dies in confirmation: the command still writes the study's choice.
    dead = NoisyRunner(dies_on=((4, 2), (2, 2), (5, 2)))
    plan, space, result = _noisy_study(dead, rounds=2)
    assert not result.confirmation.confirmed and result.choice.outcome.config.perturbation_batch_size == 4
    assert result.choice.reason.endswith("; not confirmed (every finalist's confirmation failed): "
                                         "the study's choice stands on its trial")
    tuned = tuned_plan(plan, space, result, margin=MARGIN, usable_core_ids=(0, 1))
    record = tuning_record(plan, tuned, result, margin=MARGIN, steps=20, warmup=5, confirm_rounds=2)
    assert record.chosen_trial == _trial_of(result, 4) and "confirmation kept" not in record.verdict
    # Once pooled, every finalist turns out late (2 of its 3 windows): none is confirmed.
    late = NoisyRunner(noisy=(), late_after_trial=(1, 2, 3, 4, 5))
    result = _noisy_study(late, rounds=2)[2]
    assert not result.confirmation.confirmed
    assert "no finalist hid the perturbation once pooled" in result.choice.reason


def test_finalists_are_one_per_configuration_and_none_without_a_choice():
    chosen = outcome(0, 16, 0.0101, 0.0001)
    same_config_again = outcome(1, 16, 0.0102, 0.0001)
    choice = choose([chosen], 0.010, MARGIN)
    assert [(f.outcome.number, f.roles) for f in finalists([chosen, same_config_again], [chosen], choice, 1,
                                                           MARGIN)] == [(0, ("study_choice", "cost_model"))]
    late_plan = outcome(2, 8, 0.013, 0.003)  # the cost model's trial, late in its own window: still a finalist
    assert [f.outcome.number for f in finalists([chosen, late_plan], [chosen], choice, 2, MARGIN)] == [0, 2]
    failed_plan = Outcome(3, "fail", TrialConfig("cpu", 1, 1, 8), error="WorkerError: gone")  # no numbers: not one
    assert [f.outcome.number for f in finalists([chosen, failed_plan], [chosen], choice, 3, MARGIN)] == [0]
    assert finalists([late_plan], [], choose([late_plan], 0.010, MARGIN), 2, MARGIN) == []
    # Each field's median over the windows (not one window's values); the steps add up.
    windows = [Measurement(0.012, 0.001, 0.0002, 0.005, 30), Measurement(0.010, 0.003, 0.0001, 0.004, 40),
               Measurement(0.011, 0.002, 0.0004, 0.003, 50)]
    assert pool(windows) == Measurement(0.011, 0.002, 0.0002, 0.004, 120)
    assert pool(windows[:2]).step_time_s == pytest.approx(0.011)


def test_run_study_refuses_negative_confirmation_rounds():
    with pytest.raises(UserInputError, match=r"Invalid confirmation rounds: -1 \(expected an integer >= 0\)"):
        _noisy_study(NoisyRunner(), rounds=-1)


class FakeClock:
    """Seconds that pass only when a simulated step says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_trial_times_its_steps_and_goes_on_until_its_seconds_have_passed():
    batches = ["a", "b", "c"]
    clock = FakeClock()

    def window(length: TrialLength, step_s: float) -> list[str]:
        taken = []
        for batch in timed_batches(batches, length, clock):
            taken.append(batch)
            clock.now += step_s  # the step runs
        return taken

    # 10 ms steps: 3 steps are 30 ms; 0.5 s takes 50 timed steps, after 2 warm-up ones.
    assert len(window(TrialLength(3, 2, 0.5), 0.010)) == 52
    # Slow steps: the step count is the floor, not the seconds.
    assert len(window(TrialLength(3, 2, 0.5), 1.0)) == 5
    assert len(window(TrialLength(3, 0, 0.0), 0.010)) == 3
    # A clock that never moves stops at the cap, 50x the steps; the batches are cycled, not copied.
    stuck = window(TrialLength(4, 1, 3.0), 0.0)
    assert len(stuck) == 1 + 50 * 4 == 1 + TrialLength(4, 1, 3.0).max_steps
    assert stuck[:7] == ["a", "b", "c", "a", "b", "c", "a"]
    for bad, message in [((2, 0, 0.0), "need at least 3 timed steps"), ((3, -1, 0.0), "expected >= 0"),
                         ((3, 0, -1.0), "Invalid minimum trial seconds: -1.0"),
                         ((3, 0, float("nan")), "Invalid minimum trial seconds: nan")]:
        with pytest.raises(UserInputError, match=message):
            TrialLength(*bad)
    assert TrialLength(20, 5, 3.0).max_steps == 1000


@dataclass
class ClockedRunner:
    """Times its windows with the real rule on a simulated clock: each step takes 10 ms."""

    length: TrialLength
    clock: FakeClock = field(default_factory=FakeClock)

    def _window(self, step_s: float) -> list[float]:
        times = []
        for index, _batch in enumerate(timed_batches([object()], self.length, self.clock)):
            self.clock.now += step_s
            if index >= self.length.warmup:
                times.append(step_s)
        return times

    def baseline(self) -> Baseline:
        return Baseline(statistics.median(self._window(0.010)), statistics.median(self._window(0.019)), "fake")

    def run(self, config: TrialConfig) -> Measurement:
        times = self._window(0.0101)
        return Measurement(statistics.median(times), 0.0, 0.0001, 0.004, len(times))


def test_measurement_steps_report_what_a_time_based_window_timed():
    plan = cpu_plan(6)
    space = SearchSpace.from_plan(plan, usable_cores=2)
    runner = ClockedRunner(TrialLength(steps=5, warmup=2, min_seconds=0.2))
    result = run_study(space, runner, margin=MARGIN, n_trials=2, sampler=brute_force(), confirm_rounds=1)
    assert {o.measurement.steps for o in result.outcomes} == {20}  # 0.2 s of 10.1 ms steps, not 5
    assert result.confirmation.runs[0].rounds[0].steps == 20 and result.choice.outcome.measurement.steps == 40
    record = tuning_record(plan, tuned_plan(plan, space, result, margin=MARGIN, usable_core_ids=None), result,
                           margin=MARGIN, steps=5, warmup=2, min_trial_seconds=0.2, confirm_rounds=1)
    assert {t.steps for t in record.trials} == {20} and record.confirmation[0].steps == 40


RESULTS = Path(__file__).parents[2] / "docs" / "results"
# Written by the study before confirmation existed (the *-run2 records have it).
BEFORE_CONFIRMATION = ("tuned-mnist1d-cnn-b100.tuning.json", "tuned-resnet20-b128.tuning.json")


def test_every_shipped_tuning_record_is_written_back_as_it_was():
    paths = sorted(RESULTS.glob("*.tuning.json"))
    assert set(BEFORE_CONFIRMATION) < {p.name for p in paths}
    for path in paths:
        assert load_record(Tuning, path).to_json() + "\n" == path.read_text()


def test_a_tuning_record_written_before_confirmation_loads_and_is_written_back_as_it_was():
    for path in (RESULTS / name for name in BEFORE_CONFIRMATION):
        text = path.read_text()
        record = load_record(Tuning, path)
        assert (record.confirmation, record.confirm_rounds, record.min_trial_seconds) == (None, None, None)
        assert all(t.steps is None for t in record.trials)
        assert record.to_json() + "\n" == text
        document = json.loads(text)
        assert parse_record(Tuning, {**document, "confirmation": None}).content_hash() == record.content_hash()
        assert render_tuning(record) and "Confirmation" not in _rendered(record)


def test_a_confirmation_log_is_strict():
    base = {"trial": 0, "roles": ["study_choice"], "perturbation": "cpu", "perturbation_batch_size": 4}
    pooled = {"step_time_s": 0.01, "wait_s": 0.0, "worker_time_s": 0.004, "hidden": True, "within_margin": True}
    assert parse_record(ConfirmationLog, {**base, **pooled}).hidden
    for document, message in [({**base}, "needs step_time_s"), ({**base, **pooled, "error": "x"}, "no pooled values"),
                              ({**base, **pooled, "roles": []}, r"\$\.roles"),
                              ({**base, **pooled, "roles": ["lucky"]}, r"\$\.roles\[0\]")]:
        with pytest.raises(RecordError, match=message):
            parse_record(ConfirmationLog, document)


# ----------------------------------------------------------------------------- records and tables

def _result(plan: Plan, space: SearchSpace) -> StudyResult:
    outcomes = [
        Outcome(0, "complete", TrialConfig("cpu", 1, 1, 31), Measurement(0.0130, 0.0002, 0.0030, 0.012, 10),
                from_cost_model=True),
        Outcome(1, "complete", TrialConfig("cpu", 1, 1, 16), Measurement(0.0104, 0.0003, 0.0002, 0.007, 10)),
        Outcome(2, "complete", TrialConfig("cpu", 1, 1, 8), Measurement(0.0101, 0.0001, 0.0001, 0.004, 10)),
        Outcome(3, "fail", TrialConfig("cpu", 1, 1, 24), error="WorkerError: the worker died"),
        Outcome(4, "running", TrialConfig("cpu", 1, 1, 2)),
    ]
    baseline = Baseline(0.0100, 0.0190, "cpu on cores 0,1 (2 threads)")
    return StudyResult(baseline, outcomes, pareto_front(outcomes, MARGIN), choose(outcomes, 0.0100, MARGIN), 0, 5,
                       "sqlite:////tmp/x.study.db", "asam-tune")


def test_tuned_plan_carries_the_chosen_configuration_and_its_measurements(tmp_path):
    plan = cpu_plan(32)
    space = SearchSpace.from_plan(plan, usable_cores=2)
    result = _result(plan, space)
    tuned = tuned_plan(plan, space, result, margin=MARGIN, usable_core_ids=(0, 1),
                       created_at="2026-11-27T00:00:00+00:00")
    assert (tuned.perturbation.key, tuned.perturbation.cores, tuned.perturbation_batch_size) == ("cpu/1t", (1,), 16)
    assert (tuned.main_device, tuned.main_cores, tuned.mode, tuned.feasible) == ("cpu/1t", 1, "staleness1", True)
    p = tuned.predictions
    assert (p.sgd_step_s, p.sam_step_s, p.asam_step_s, p.perturbation_time_s) == (0.0100, 0.0190, 0.0104, 0.007)
    assert p.main_time_s == pytest.approx(0.0102) and p.hidden_fraction == pytest.approx(0.86 / 0.9)
    assert p.transfer_time_s == plan.predictions.transfer_time_s and p.transfer == plan.predictions.transfer
    assert [a.perturbation_batch_size for a in tuned.alternatives] == [8]  # the rest of the front
    assert "trial 1 of study 'asam-tune'" in tuned.notes[0]
    dump_record(tuned, tmp_path / "tuned.json")
    assert load_record(Plan, tmp_path / "tuned.json") == tuned
    assert tuned_plan(plan, space, StudyResult(result.baseline, [], [], choose([], 0.01, MARGIN), None, 0, "m", "s"),
                      margin=MARGIN, usable_core_ids=None) is None


def test_tuning_record_round_trips_and_renders(tmp_path):
    plan = cpu_plan(32)
    space = SearchSpace.from_plan(plan, usable_cores=2)
    result = _result(plan, space)
    tuned = tuned_plan(plan, space, result, margin=MARGIN, usable_core_ids=(0, 1))
    record = tuning_record(plan, tuned, result, margin=MARGIN, steps=10, warmup=2)
    assert (record.kind, record.planned_trial, record.chosen_trial) == ("asam-tune-tuning", 0, 1)
    assert record.tuned_plan_hash == tuned.content_hash() and record.source_plan_hash == plan.content_hash()
    assert [t.pareto for t in record.trials] == [False, True, True, False, False]
    assert record.trial(4).state == "running" and record.trial(3).error == "WorkerError: the worker died"
    dump_record(record, tmp_path / "t.tuning.json")
    assert load_record(Tuning, tmp_path / "t.tuning.json") == record
    document = json.loads((tmp_path / "t.tuning.json").read_text())
    document["trials"][1]["state"] = "exploded"
    (tmp_path / "bad.json").write_text(json.dumps(document))
    with pytest.raises(RecordError, match=r"\$\.trials\[1\]\.state"):
        load_record(Tuning, tmp_path / "bad.json")

    console = Console(file=io.StringIO(), width=200)
    for table in render_tuning(record):
        console.print(table)
    text = console.file.getvalue()
    for expected in ("Predicted vs measured", "Pareto front", "front; chosen", "cost model",
                     "WorkerError: the worker died", "5: 3 complete, 1 failed, 1 other"):
        assert expected in text


# ----------------------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_tune_arguments(parser.add_subparsers(dest="command").add_parser("tune"))
    return parser


def test_parser_flags_and_paths(tmp_path):
    args = _parser().parse_args(["tune", "--plan", "p.json", "--trials", "3", "--timeout", "60", "-o", "out/t.json",
                                 "--steps-per-trial", "5", "--format", "json"])
    assert (args.plan, args.profile, args.trials, args.timeout, args.steps_per_trial, args.storage) == \
        ("p.json", None, 3, 60.0, 5, None)
    for bad in (["tune", "-o", "x.json"], ["tune", "--plan", "p", "--profile", "q", "-o", "x"],
                ["tune", "--plan", "p", "-o", "x", "--trials", "0"],
                ["tune", "--plan", "p", "-o", "x", "--margin", "1"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(bad)
    assert tuning_record_path("out/t.json").as_posix() == "out/t.tuning.json"
    assert default_storage(tmp_path / "t.json") == f"sqlite:///{tmp_path / 't.study.db'}"
    assert (args.min_trial_seconds, args.confirm_rounds) == (3.0, 2)  # the defaults
    args = _parser().parse_args(["tune", "--plan", "p", "-o", "x", "--min-trial-seconds", "0", "--confirm-rounds", "0"])
    assert (args.min_trial_seconds, args.confirm_rounds) == (0.0, 0)


@pytest.mark.parametrize("flags, message", [
    (["--min-trial-seconds", "-1"], "argument --min-trial-seconds: expected a number >= 0, got '-1'"),
    (["--min-trial-seconds", "inf"], "argument --min-trial-seconds: expected a number >= 0, got 'inf'"),
    (["--confirm-rounds", "-2"], "argument --confirm-rounds: expected an integer >= 0, got '-2'"),
    (["--confirm-rounds", "1.5"], "argument --confirm-rounds: expected an integer >= 0, got '1.5'"),
])
def test_bad_trial_length_and_confirmation_flags_are_one_line_errors(flags, message, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["tune", "--plan", "p", "-o", "x"] + flags)
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


def test_user_mistakes_are_one_line_errors_before_any_measurement(tmp_path):
    dump_record(cpu_plan(32), tmp_path / "plan.json")
    base = ["tune", "-o", str(tmp_path / "t.json"), "--allow-other-machine"]
    cases = [
        (["--profile", str(tmp_path / "plan.json")], "--profile needs --batch-size"),
        (["--plan", str(tmp_path / "plan.json"), "-b", "64"], "--batch-size 64 differs from the plan's batch size 32"),
        (["--plan", str(tmp_path / "plan.json"), "--workload", "resnet20"],
         "the plan is for workload 'mnist1d-cnn', not 'resnet20'"),
        (["--plan", str(tmp_path / "plan.json"), "--rho", "0"], "Invalid --rho: 0.0"),
        (["--plan", str(tmp_path / "nope.json")], "no such file"),
    ]
    for extra, message in cases:
        with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                run_tune(_parser().parse_args(base + extra))
    assert not (tmp_path / "t.json").exists()


def test_a_namespace_built_in_code_is_checked_like_the_command_line(tmp_path):
    dump_record(cpu_plan(32), tmp_path / "plan.json")
    for name, value, message in [("min_trial_seconds", -1.0, r"Invalid --min-trial-seconds: -1.0 \(expected a number"),
                                 ("min_trial_seconds", float("nan"), "Invalid --min-trial-seconds: nan"),
                                 ("confirm_rounds", -1, r"Invalid --confirm-rounds: -1 \(expected an integer >= 0\)")]:
        args = _parser().parse_args(["tune", "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "t.json"),
                                     "--allow-other-machine"])
        setattr(args, name, value)
        with pytest.raises(UserInputError, match=message):
            run_tune(args)
    assert not (tmp_path / "t.json").exists()
