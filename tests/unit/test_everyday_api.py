"""API defaults a training script meets: the main process's placement from a plan or its path,
before or after AsyncSAM, without turning this machine into "another machine"; cpus_needed on
a CPU-only profile."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from asam_tune import api
from asam_tune import fingerprint as discovery
from asam_tune.costmodel.planner import make_plan
from asam_tune.errors import UserInputError
from asam_tune.records import dump_record
from asam_tune.runtime import main_process_placement
from asam_tune.affinity import can_pin
from tests.fixtures.costmodel_profiles import affine, contention, cpu_only_profile, profile

SHIPPED_CPU_PROFILE = Path(__file__).resolve().parents[2] / "profiles" / "cpu-2core-mnist1d-cnn.json"


def _this_machines_plan():
    """A plan (main on one core, the worker on another) whose machine is this one."""
    machine = cpu_only_profile({1: 0.008, 2: 0.0045}, cores=2)
    machine = machine.model_copy(update={"fingerprint": discovery.collect_fingerprint()})
    return make_plan(machine, 64, main_device="cpu/1t", asynchronous=True)


def _needs_two_pinnable_cores():
    if not can_pin() or len(discovery.usable_core_ids()) < 2:
        pytest.skip("needs two usable cores and a platform that pins processes")


# ----------------------------------------------------------------------------- the fingerprint

def test_discovery_sees_the_affinity_from_before_our_own_placement():
    assert discovery._affinity_before_placement is None
    with discovery.placed_by_asam_tune((0, 1, 2, 3)):
        assert discovery._affinity(None) == (0, 1, 2, 3)
        with discovery.placed_by_asam_tune((0,)):  # nested: the outermost 'before' holds
            assert discovery._affinity(None) == (0, 1, 2, 3)
        assert discovery._affinity(lambda: {5}) == (5,)  # an injected source is still asked
    assert discovery._affinity_before_placement is None
    with discovery.placed_by_asam_tune(None):  # affinity unknown: nothing changes
        assert discovery._affinity_before_placement is None


def test_the_before_affinity_is_cleared_after_an_exception():
    with pytest.raises(RuntimeError):
        with discovery.placed_by_asam_tune((0, 1)):
            raise RuntimeError("boom")
    assert discovery._affinity_before_placement is None


# ----------------------------------------------------------------------------- placement

@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs CPU affinity (Linux)")
def test_placement_takes_a_plan_path_and_this_stays_the_same_machine(tmp_path):
    _needs_two_pinnable_cores()
    plan = _this_machines_plan()
    path = tmp_path / "plan.json"
    dump_record(plan, path)
    outside = (discovery.usable_core_ids(), discovery.collect_fingerprint().cpu.usable_cores)
    for given in (path, str(path), plan):
        with main_process_placement(given) as (device, cores, threads):
            assert os.sched_getaffinity(0) == set(cores) and len(cores) == 1 and threads == 1
            # The issue: "plan was made on another machine (usable cores: 2 != 1)".
            assert api.check_machine(plan) == []
            assert (discovery.usable_core_ids(), discovery.collect_fingerprint().cpu.usable_cores) == outside
        assert discovery._affinity_before_placement is None


def test_placement_refuses_what_is_not_a_plan(tmp_path):
    with pytest.raises(UserInputError, match="needs a Plan or the path of one, got dict"):
        with main_process_placement({}):
            pass
    with pytest.raises(UserInputError, match="no such file"):
        with main_process_placement(tmp_path / "absent.json"):
            pass


@pytest.mark.process
@pytest.mark.timeout(180)
@pytest.mark.parametrize("placement_first", [True, False], ids=["placement-then-asyncsam", "asyncsam-then-placement"])
def test_placement_works_before_or_after_asyncsam_is_built(tmp_path, placement_first):
    """The README's order and the other one, with a real worker process."""
    _needs_two_pinnable_cores()
    from asam_tune.runtime import AsyncSAM
    from asam_tune.workloads import describe, load_workload

    workload = load_workload("mnist1d-cnn")
    torch.manual_seed(0)
    model = workload.build()
    plan = _this_machines_plan()
    plan = plan.model_copy(update={"workload": describe(workload, model)})  # the plan fits this model
    path = tmp_path / "plan.json"
    dump_record(plan, path)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    data = [workload.make_batch(64, generator=generator) for _ in range(4)]

    def train(sam) -> None:
        for x, y in sam.lookahead(data):
            sam.step(x, y)

    if placement_first:
        with main_process_placement(path), AsyncSAM(model, optimizer, workload.loss_fn, 0.05, plan=path,
                                                    adapt=False) as sam:
            train(sam)
    else:
        with AsyncSAM(model, optimizer, workload.loss_fn, 0.05, plan=path, adapt=False) as sam:
            with main_process_placement(path):
                train(sam)
    assert sam.stats().staleness_histogram.get(1, 0) >= 1  # the worker's results were used


# ----------------------------------------------------------------------------- cpus_needed

def test_cpus_needed_on_a_cpu_profile_picks_the_main_configuration_and_says_which():
    machine = cpu_only_profile({1: 0.008, 2: 0.0045, 4: 0.0026}, cores=8,
                               contention=[contention("cpu/4t", "cpu/2t", 1.05)])
    need = api.cpus_needed(machine, 128)
    assert need.main_device == "cpu/4t"  # what the profiler measured as the main process
    assert "main process cpu/4t: the profile's main configuration" in need.explanation
    explicit = api.cpus_needed(machine, 128, main_device="cpu/1t")
    assert explicit.main_device == "cpu/1t" and "profile's main configuration" not in explicit.explanation


def test_cpus_needed_without_contention_takes_the_first_measured_configuration():
    machine = profile(affine("cpu/2t", 0.001, 0.004), affine("cpu/1t", 0.001, 0.008), cores=4)
    assert api.profile_main_device(machine) == "cpu/2t"
    assert api.cpus_needed(machine, 64).main_device == "cpu/2t"


def test_the_readmes_cpus_needed_call_works_on_a_shipped_cpu_profile():
    need = api.cpus_needed(api.load_profile(SHIPPED_CPU_PROFILE), batch_size=128)
    assert need.main_device == "cpu/1t" and need.explanation
    assert need.cores_per_rank is None or need.cores_per_rank >= 2
