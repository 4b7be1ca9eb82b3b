"""The benchmark scripts run end to end on the CPU at a tiny size and report what they claim.

No timing threshold (benchmarks are scripts; their numbers depend on the machine's load): the
checks are the bookkeeping that must hold whatever the timings are.
"""
from __future__ import annotations

import json
import math

import pytest

from asam_tune.bench import adapt, compare
from asam_tune.fingerprint import usable_core_ids
from asam_tune.records import Plan, load_record
from asam_tune.affinity import can_pin

pytestmark = [pytest.mark.process, pytest.mark.slow, pytest.mark.timeout(240)]
PROFILE = "profiles/cpu-2core-mnist1d-cnn.json"


def _two_cores() -> tuple[int, int]:
    usable = usable_core_ids()
    if not can_pin() or len(usable) < 2:
        pytest.skip("needs two usable cores and a platform that pins processes")
    return usable[0], usable[1]


def test_adapt_bench_runs_both_scenarios_and_keeps_b_p_in_bounds():
    main_core, worker_core = _two_cores()
    steps, load_at, batch = 40, 20, 16
    result = adapt.run_adapt_bench("mnist1d-cnn", batch, steps=steps, load_at=load_at, main_core=main_core,
                                   worker_core=worker_core, sgd_steps=5)
    json.dumps(result, allow_nan=False)  # what --output writes
    assert 1 <= result["estimate"]["hiding_bp"] <= batch
    for name in ("wrong_plan", "competing_load"):
        run = result[name]
        assert len(run["step_times_s"]) == len(run["b_p"]) == len(run["rolling_ratio"]) == steps
        assert all(1 <= b <= batch for b in run["b_p"])
        assert run["trajectory"][0] == [0, run["initial_bp"]]
        assert run["b_p"][-1] == run["trajectory"][-1][1] == run["final_b_p"]
        assert run["rolling_ratio"][adapt.ROLLING_WINDOW - 2] is None
        assert math.isfinite(run["final_ratio"]) and run["fallbacks"] == 0
    assert result["wrong_plan"]["initial_bp"] == result["estimate"]["hiding_bp"]
    assert result["competing_load"]["load_at"] == load_at
    assert "wrong plan (load from step 0)" in adapt.report(result)


def test_adapt_bench_refuses_bad_arguments():
    with pytest.raises(adapt.UserInputError, match="load"):
        adapt.run_adapt_bench("mnist1d-cnn", 16, steps=40, load="fire")
    with pytest.raises(adapt.UserInputError, match="load_at"):
        adapt.run_adapt_bench("mnist1d-cnn", 16, steps=40, load_at=40)
    with pytest.raises(adapt.UserInputError, match="staleness"):
        adapt.run_adapt_bench("mnist1d-cnn", 16, steps=40, staleness=0)


def _plan(b_p: int) -> Plan:
    plan = load_record(Plan, PROFILE.replace("profiles/cpu-2core-", "docs/results/plan-").replace(".json", "-b100.json"))
    return plan.model_copy(update={"perturbation_batch_size": b_p})


def test_compare_bench_measures_the_plan_the_tuned_plan_and_the_adapted_run():
    _two_cores()
    plan, tuned = _plan(40), _plan(10)
    result = compare.run_compare(plan, tuned, steps=10, warmup=2)
    json.dumps(result, allow_nan=False)
    assert [result[name]["b_p"] for name in ("plan", "tuned")] == [40, 10]
    adapted = result["adapted"]
    assert adapted["initial_b_p"] == 40 and adapted["steps"] == 10  # the second half of 2 x 10 steps
    assert adapted["b_p_trajectory"][0] == [0, 40] and adapted["b_p"] == adapted["b_p_trajectory"][-1][1]
    for name in ("plan", "tuned", "adapted"):
        run = result[name]
        assert run["asam_over_sgd"] > 0 and run["fallbacks"] == 0
        assert run["predicted_step_s"] == plan.predictions.asam_step_s
    table = compare.markdown(result)
    assert "| tuned plan (`asam-tune tune`) | 10 |" in table and "| plan + online adaptation" in table
    assert result["sgd_all_cores"]["threads"] == len(usable_core_ids())
    assert all(result[name]["asam_over_sgd_all_cores"] > 0 for name in ("plan", "tuned", "adapted"))


def test_compare_bench_refuses_plans_of_different_problems():
    plan = _plan(40)
    other = plan.model_copy(update={"batch_size": 64, "perturbation_batch_size": 10})
    with pytest.raises(compare.UserInputError, match="compare plans of one problem"):
        compare.run_compare(plan, other)
    synchronous = plan.model_copy(update={"mode": "synchronous", "staleness": 0})
    with pytest.raises(compare.UserInputError, match="--asynchronous"):
        compare.run_compare(synchronous, plan)
