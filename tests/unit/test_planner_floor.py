"""The quality floor: b_p >= ceil(floor x B), partial hiding when that is more than hides, the
trade the plan records, and the rho rule it carries. Answers computed by hand in the comments.

Default machine (tests.fixtures.costmodel_profiles.gpu_with_cpu): 8 cores, cuda:0 with
fwd_bwd = 0.01 + 0.0001 b and opt 0.001, the CPU at t threads with 0.002 + (0.004 / t) b, no
transfers, contention or handover measured (assumed 0 and 1.0). At B = 100: T_main = 0.021,
budget 0.01995, T_SGD = 0.021, T_SAM = 0.041. The worker may use 7 cores: cpu/1t, 2t, 4t.
Without a floor cpu/4t hides b_p = 17 (0.002 + 0.001 b <= 0.01995).
"""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asam_tune.costmodel import make_plan
from asam_tune.costmodel.quality import DEFAULT_FLOORS, DEFAULT_RHO_RULE, GAIN_TABLES, USER_FLOOR_SOURCE
from asam_tune.errors import UserInputError
from asam_tune.records.rho_rule import NO_RHO_RULE
from tests.fixtures.costmodel_profiles import affine, cpu_only_profile, gpu_with_cpu, handover, profile


# A floor above what hides, so that the arithmetic by hand exercises partial hiding whatever the
# shipped default floor is (test_the_default_floor_is_the_measured_one checks that one).
QUARTER = 0.25


def test_the_default_floor_is_the_measured_one():
    plan = make_plan(gpu_with_cpu(), 100)
    value, source = DEFAULT_FLOORS["power"]
    q = plan.quality
    assert (q.min_perturbation_fraction, q.min_perturbation_batch_size) == (value, math.ceil(value * 100 - 1e-9))
    assert q.floor_source == source and plan.rho_rule == DEFAULT_RHO_RULE
    assert plan.perturbation_batch_size >= q.min_perturbation_batch_size


def test_a_floor_above_what_hides_forces_partial_hiding_by_hand():
    plan = make_plan(gpu_with_cpu(), 100, min_perturbation_fraction=QUARTER)
    # Floor 0.25 -> b_p >= 25. cpu/4t: T_pert(25) = 0.002 + 0.025 = 0.027 > T_main = 0.021: the main step
    # waits, step = max(0.021, 0.027 + 0) = 0.027. cpu/2t: 0.052, cpu/1t: 0.102. SAM: 0.041.
    assert plan.schema_version == 2
    assert (plan.perturbation.key, plan.perturbation_batch_size) == ("cpu/4t", 25)
    assert (plan.mode, plan.staleness, plan.feasible, plan.hiding) == ("staleness1", 1, False, "partial")
    assert plan.predictions.asam_step_s == pytest.approx(0.027)
    assert plan.predictions.main_time_s == pytest.approx(0.021)
    assert plan.predictions.hidden_fraction == pytest.approx((0.041 - 0.027) / 0.020)
    assert plan.rho_rule == DEFAULT_RHO_RULE
    q = plan.quality
    assert (q.min_perturbation_fraction, q.min_perturbation_batch_size) == (QUARTER, 25)
    assert q.floor_source == USER_FLOOR_SOURCE
    gain = GAIN_TABLES["power"].at(0.25)
    assert (q.expected_gain.perturbation_fraction, q.expected_gain.value, q.expected_gain.bound) == (
        0.25, gain.value, gain.bound)
    assert "partially" in plan.verdict and f"{gain.value:.0%}" in plan.verdict
    assert any("forces partial hiding" in n and "waits about 6 ms" in n for n in plan.notes)
    assert any("hiding the ascent fully would need b_p=17" in n for n in plan.notes)
    # The alternatives keep the floor too, partially hidden.
    assert [(a.perturbation.key, a.perturbation_batch_size, a.hiding) for a in plan.alternatives] == [
        ("cpu/2t", 25, "partial"), ("cpu/1t", 25, "partial")]


def test_the_trade_shows_both_plans_and_why():
    trade = make_plan(gpu_with_cpu(), 100, min_perturbation_fraction=QUARTER).trade
    assert (trade.hides_fully.perturbation, trade.hides_fully.perturbation_batch_size,
            trade.hides_fully.hiding) == ("cpu/4t", 17, "full")
    assert trade.hides_fully.asam_step_s == pytest.approx(0.021)
    # 0.17 lies between two measured fractions: linear in log(b_p/B) (test_quality.py checks how).
    assert trade.hides_fully.expected_gain == GAIN_TABLES["power"].at(0.17)
    assert (trade.keeps_gain.perturbation_batch_size, trade.keeps_gain.hiding) == (25, "partial")
    assert trade.chosen == "keeps_gain"
    assert "forces partial hiding" in trade.reason and "\n" not in trade.reason


def test_the_handover_lengthens_the_partially_hidden_step():
    machine = profile(*gpu_with_cpu().devices, handovers=[handover("cuda:0", "cpu/4t", 0.002)])
    plan = make_plan(machine, 100, min_perturbation_fraction=QUARTER)
    # T_main = 0.021 + 0.002 = 0.023; the worker's cycle 0.027 + 0.002 = 0.029.
    assert (plan.perturbation.key, plan.perturbation_batch_size) == ("cpu/4t", 25)
    assert plan.predictions.asam_step_s == pytest.approx(0.029)


def test_a_floor_that_hiding_reaches_hides_fully_with_the_larger_b_p():
    plan = make_plan(gpu_with_cpu(), 100, min_perturbation_fraction=0.1)
    assert (plan.perturbation_batch_size, plan.hiding, plan.feasible) == (17, "full", True)
    assert plan.quality.min_perturbation_batch_size == 10
    assert plan.quality.floor_source == USER_FLOOR_SOURCE
    assert plan.trade.chosen == "keeps_gain" and "hides the ascent fully" in plan.trade.reason
    assert not any("forces partial hiding" in n for n in plan.notes)


def test_a_floor_slower_than_sam_gives_synchronous_sam_and_says_why():
    # A floor of 1: cpu/4t at b_p = 100 takes 0.102 > T_SAM 0.041.
    plan = make_plan(gpu_with_cpu(), 100, min_perturbation_fraction=1.0)
    assert (plan.mode, plan.hiding, plan.perturbation_batch_size) == ("synchronous", "none", 100)
    assert "even at the quality floor" in plan.verdict and "synchronous SAM is the honest choice" in plan.verdict
    assert plan.trade.chosen == "synchronous" and "honest choice" in plan.trade.reason
    assert plan.quality.expected_gain.value == 1.0  # SAM itself
    assert [a.hiding for a in plan.alternatives] == ["partial"] * 3


def test_asked_for_asynchronous_keeps_the_floor_and_notes_the_cost():
    with pytest.warns(UserWarning, match="slower than synchronous SAM"):
        plan = make_plan(gpu_with_cpu(), 100, min_perturbation_fraction=1.0, asynchronous=True)
    assert (plan.mode, plan.hiding, plan.perturbation_batch_size) == ("staleness1", "partial", 100)
    assert any("asynchronous SAM was asked for" in n for n in plan.notes)
    assert "asked for" in plan.trade.reason


def test_no_device_holds_the_floor_in_memory():
    machine = profile(affine("cuda:0", 0.01, 0.0001),
                      *(affine(f"cpu/{t}t", 0.002, 0.004 / t, oom_from=20) for t in (1, 2, 4)))
    plan = make_plan(machine, 100, min_perturbation_fraction=QUARTER)
    assert plan.mode == "synchronous" and "can hold b_p >= 25" in plan.verdict
    assert plan.trade.keeps_gain is None and plan.trade.hides_fully is not None


def test_partial_hiding_can_end_within_the_main_step_past_the_margin():
    # CPU only, 8 cores, B = 64: the split 4 + 4 hides b_p = 61 (tests/unit/test_planner.py). With a
    # floor of 1, T_pert(64) = 0.001 + 0.0026 * 64 = 0.1674 <= T_main = 0.1684: no wait, but past the margin.
    plan = make_plan(cpu_only_profile(), 64, min_perturbation_fraction=1.0)
    assert (plan.main_device, plan.perturbation.key, plan.perturbation_batch_size) == ("cpu/4t", "cpu/4t", 64)
    assert plan.hiding == "partial" and plan.predictions.asam_step_s == pytest.approx(0.1684)


def test_rho_rule_none_has_its_own_floor_and_says_rho_stays():
    plan = make_plan(gpu_with_cpu(), 100, rho_rule="none")
    assert plan.rho_rule == NO_RHO_RULE
    # Without the rule only b_p = B was measured to keep the gain: b_p = 100 costs 0.102 on cpu/4t.
    assert plan.quality.min_perturbation_fraction == DEFAULT_FLOORS["none"][0] == 1.0
    assert plan.mode == "synchronous"
    assert "rho stays the same at every b_p (rho_rule none)" in plan.notes


def test_the_rule_is_noted_with_its_factor_at_b_p():
    plan = make_plan(gpu_with_cpu(), 100, min_perturbation_fraction=QUARTER)
    factor = DEFAULT_RHO_RULE.factor(25, 100)
    assert any(f"rho x {factor:.2f} at b_p=25" in n for n in plan.notes)


def test_no_floor_is_the_version_1_choice():
    plan = make_plan(gpu_with_cpu(), 100, min_perturbation_fraction=None)
    assert (plan.perturbation_batch_size, plan.hiding) == (17, "full")
    assert plan.quality.min_perturbation_fraction is None and plan.min_perturbation_batch_size == 1
    assert plan.trade.keeps_gain is None and plan.trade.chosen == "hides_fully"
    # Nothing hides one sample: non-blocking, as before, and its gain is at most the measured one.
    stale = make_plan(profile(affine("cuda:0", 0.001, 0.00001), affine("cpu/1t", 0.05, 0.004)), 100,
                      min_perturbation_fraction=None, asynchronous=True)
    assert (stale.mode, stale.hiding) == ("non_blocking", "stale")
    assert stale.quality.expected_gain.bound == "at_most"


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, "x", True, float("nan")])
def test_bad_floors_are_user_errors(bad):
    with pytest.raises(UserInputError, match="min_perturbation_fraction"):
        make_plan(gpu_with_cpu(), 100, min_perturbation_fraction=bad)


def test_bad_rules_are_user_errors():
    with pytest.raises(UserInputError, match="rho rule"):
        make_plan(gpu_with_cpu(), 100, rho_rule="linear")


@settings(max_examples=40, deadline=None)
@given(fraction=st.floats(0.01, 1.0), batch=st.integers(8, 512), slope=st.floats(0.0002, 0.01))
def test_an_asynchronous_plan_never_goes_below_the_floor(fraction, batch, slope):
    machine = profile(affine("cuda:0", 0.01, 0.0001), affine("cpu/4t", 0.002, slope))
    plan = make_plan(machine, batch, min_perturbation_fraction=fraction)
    assert plan.perturbation_batch_size >= math.ceil(fraction * batch - 1e-9)
    assert plan.predictions.hidden_fraction <= 1 + 1e-9
    if plan.mode != "synchronous":
        assert plan.predictions.asam_step_s < plan.predictions.sam_step_s
