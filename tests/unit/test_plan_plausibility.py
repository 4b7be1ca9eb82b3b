"""Impossible predictions are refused (busy profile) or warned about, and the profile's busy flag
reaches the plan."""
from __future__ import annotations

import warnings

import pytest

from asam_tune.costmodel import make_plan
from asam_tune.costmodel.plausibility import EQUIVALENT_SHARE, ImplausiblePlanError, findings, load_summary
from asam_tune.errors import UserInputError
from asam_tune.records import MachineLoad
from tests.fixtures.costmodel_profiles import contention, cpu_only_profile, gpu_with_cpu, profile

BUSY = MachineLoad(start=(3.0, 2.5, 1.0), end=(3.1, 2.6, 1.1), usable_cores=2, elapsed_s=30.0,
                   profiler_busy_cores=1.0)
IDLE = MachineLoad(start=(0.1, 0.1, 0.1), end=(0.6, 0.3, 0.2), usable_cores=2, elapsed_s=30.0,
                   profiler_busy_cores=1.0)


def _impossible(load: MachineLoad | None):
    """cuda:0 measured twice as fast while the CPU worker computes (contention 0.5, e.g. its
    'alone' timing inflated by another job): the main step, 0.02 x 0.5 + 0.001 = 11 ms, would
    beat SGD's 21 ms. The worker cores are those of the 2-core load record."""
    machine = profile(*gpu_with_cpu().devices, contention=[contention("cuda:0", "cpu/4t", 0.5)])
    return machine.model_copy(update={"machine_load": load})


FLOOR = 0.05  # b_p >= 5: cpu/4t hides 8 within 0.95 x 11 ms, fully


@pytest.mark.filterwarnings("ignore:the profile was measured on a busy machine")
def test_impossible_predictions_from_a_busy_profile_are_refused():
    with pytest.raises(ImplausiblePlanError, match="faster than SGD") as caught:
        make_plan(_impossible(BUSY), 100, min_perturbation_fraction=FLOOR)
    assert isinstance(caught.value, UserInputError)  # the CLI's one-line error, exit 2
    assert "busy machine" in str(caught.value) and "\n" not in str(caught.value)


def test_impossible_predictions_from_an_idle_profile_are_warned_about_and_noted():
    with pytest.warns(UserWarning, match="impossible prediction"):
        plan = make_plan(_impossible(IDLE), 100, min_perturbation_fraction=FLOOR)
    assert any(n.startswith("impossible prediction") for n in plan.notes)
    assert plan.profile_load.busy is False


@pytest.mark.filterwarnings("ignore:the profile was measured on a busy machine")
def test_inflated_points_of_all_cores_do_not_make_a_baseline_slower_than_the_split():
    """Another job inflated cpu/2t (SGD on both cores: 3.2 s at B = 64) and not cpu/1t (66 ms):
    the baseline is the fastest configuration within the cores, cpu/1t, so the split 1 + 1 is not
    predicted faster than SGD (issue: "196% hidden, async 0.04x SGD")."""
    plan = make_plan(cpu_only_profile({1: 0.001, 2: 0.05}, cores=2).model_copy(update={"machine_load": BUSY}), 64,
                     asynchronous=True)
    assert plan.predictions.sgd_step_s == pytest.approx(0.001 + 0.064 + 0.001)
    assert plan.predictions.hidden_fraction <= 1
    assert plan.profile_load.busy is True


def test_the_busy_flag_reaches_the_plan_and_a_warning():
    # 6 runnable tasks on 8 cores: above the 0.5 per core the profiler calls busy.
    load = BUSY.model_copy(update={"start": (6.0, 5.0, 4.0), "usable_cores": 8})
    machine = gpu_with_cpu().model_copy(update={"machine_load": load})
    with pytest.warns(UserWarning, match="busy machine"):
        plan = make_plan(machine, 100)
    assert plan.profile_load.busy is True and "BUSY" in plan.profile_load.summary
    assert plan.profile_load.machine_load == machine.machine_load
    assert any("measured on a busy machine" in n for n in plan.notes)


def test_an_unrecorded_load_is_unknown_not_idle():
    plan = make_plan(gpu_with_cpu(), 100)
    assert plan.profile_load.busy is None and "not recorded" in plan.profile_load.summary
    assert load_summary(IDLE)[0] is False


def test_a_plausible_plan_warns_about_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_plan(gpu_with_cpu(), 100)


@pytest.mark.parametrize("asam, spread, expected", [
    (0.0096, 0.0, "impossible"),  # 4% under SGD's 10 ms: beyond the 3% floor of noise
    (0.0098, 0.0, None),  # 2% under: noise
    (0.0090, 0.0011, None),  # 10% under, within the spreads added (0.0011 + 0)
    (0.0215, 0.0, "slower"),  # beyond SAM's 20 ms
])
def test_beyond_noise_by_hand(asam, spread, expected):
    found = findings(sgd_step_s=0.010, sam_step_s=0.020, asam_step_s=asam, asam_uncertainty_s=spread,
                     sgd_uncertainty_s=0.0, busy=False)
    assert EQUIVALENT_SHARE == 0.03
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and expected in found[0].message and not found[0].refuse
        assert found[0].impossible == (expected == "impossible")
