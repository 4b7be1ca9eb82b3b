"""The main process's placement from a plan: its own cores and threads inside, restored after."""
from __future__ import annotations

import os

import pytest
import torch

from asam_tune.costmodel.planner import make_plan
from asam_tune.runtime import main_process_placement
from asam_tune.runtime.placement import main_placement
from tests.fixtures.costmodel_profiles import cpu_only_profile

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs CPU affinity (Linux)")


def test_main_process_runs_on_the_plans_main_cores_and_gets_its_own_back():
    plan = make_plan(cpu_only_profile({1: 0.008, 2: 0.0045}, cores=2), 64, main_device="cpu/1t", asynchronous=True)
    assert plan.perturbation.cores == (1,) and plan.main_cores == 1
    before = (os.sched_getaffinity(0), torch.get_num_threads())
    device, cores, threads = main_placement(plan)
    assert device == torch.device("cpu") and threads == 1 and 1 not in cores
    with main_process_placement(plan):
        assert os.sched_getaffinity(0) == set(cores)
        assert torch.get_num_threads() == 1
    assert (os.sched_getaffinity(0), torch.get_num_threads()) == before


def test_placement_is_restored_after_an_exception():
    plan = make_plan(cpu_only_profile({1: 0.008, 2: 0.0045}, cores=2), 64, main_device="cpu/1t", asynchronous=True)
    before = (os.sched_getaffinity(0), torch.get_num_threads())
    with pytest.raises(RuntimeError):
        with main_process_placement(plan):
            raise RuntimeError("boom")
    assert (os.sched_getaffinity(0), torch.get_num_threads()) == before
