"""The planner on hand-made profiles whose answers are computed by hand in the comments.

Default machine (tests.fixtures.costmodel_profiles.gpu_with_cpu): 8 cores, cuda:0 with
fwd_bwd = 0.01 + 0.0001 b and opt 0.001, the CPU at t threads with 0.002 + (0.004 / t) b.
At B = 100: T_main = 0.02 + 0.001 = 0.021, budget = 0.95 * 0.021 = 0.01995,
T_SGD = 0.021, T_SAM = 0.041. The main process keeps one core: the worker may use 7.

These tests check the hiding formulas, so they plan without a quality floor (the version-1
behaviour: b_p as large as hides fully, however small); tests/unit/test_planner_floor.py tests
the floor.
"""
from __future__ import annotations

import functools
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from asam_tune.costmodel import cpus_needed
from asam_tune.costmodel import make_plan as make_plan_with_floor
from asam_tune.costmodel.planner import EQUIVALENT_STEP_TIME
from asam_tune.errors import UserInputError
from tests.fixtures.costmodel_profiles import (affine, contention, cpu_only_profile, gpu_with_cpu, handover, profile,
                                               transfer)

make_plan = functools.partial(make_plan_with_floor, min_perturbation_fraction=None)


def test_gpu_main_with_cpu_worker_by_hand():
    plan = make_plan(gpu_with_cpu(), 100)
    # cpu/4t: 0.002 + 0.001 b <= 0.01995 -> b <= 17.95; cpu/2t -> 8; cpu/1t -> 4; cpu/8t needs 9 cores.
    assert plan.main_device == "cuda:0" and plan.main_cores == 1
    assert plan.perturbation.key == "cpu/4t" and plan.perturbation.threads == 4
    assert plan.perturbation.cores == (1, 2, 3, 4)  # after the main process's core 0
    assert plan.perturbation_batch_size == 17
    assert (plan.mode, plan.staleness, plan.feasible) == ("staleness1", 1, True)
    p = plan.predictions
    assert p.sgd_step_s == pytest.approx(0.021)
    assert p.sam_step_s == pytest.approx(0.041)
    assert p.asam_step_s == pytest.approx(0.021)
    assert p.perturbation_time_s == pytest.approx(0.019)
    assert p.hidden_fraction == pytest.approx(1.0)
    assert p.speedup_over_sam == pytest.approx(0.041 / 0.021)
    assert (p.contention, p.transfer) == ("assumed", "assumed")
    assert any("not measured: assumed none (1.0)" in n for n in plan.notes)
    # A profile without handovers (version 1) adds none to the main step, and says so.
    assert any("handover cuda:0 -> cpu/4t" in n and "assumed 0 s" in n for n in plan.notes)
    alternatives = [(a.perturbation.key, a.perturbation_batch_size) for a in plan.alternatives]
    assert alternatives == [("cpu/2t", 8), ("cpu/1t", 4)]


def test_exact_boundary_counts_as_hidden():
    # margin 0: budget 0.021, and 0.002 + 0.001 * 19 = 0.021 exactly.
    assert make_plan(gpu_with_cpu(), 100, margin=0.0).perturbation_batch_size == 19


def test_pinned_transfers_to_a_cpu_worker_lengthen_the_worker_only():
    measured = profile(*gpu_with_cpu().devices, transfers=[transfer("cuda:0", "cpu", 0.002, 0.001)])
    plan = make_plan(measured, 100)
    # The copies run on a copy stream: T_main stays 0.021, budget 0.95 * 0.021 = 0.01995. The
    # worker starts after the first copy: 0.002 + 0.001 b + 0.003 <= 0.01995 -> b <= 14.95 -> 14.
    assert plan.perturbation_batch_size == 14
    p = plan.predictions
    assert p.transfer_time_s == pytest.approx(0.003)
    assert p.main_time_s == pytest.approx(0.021) and p.asam_step_s == pytest.approx(0.021)
    assert p.perturbation_time_s == pytest.approx(0.019)
    assert "transfer times are those measured with pinned host memory" in plan.notes


def test_pageable_transfers_to_a_cpu_worker_lengthen_the_main_step_and_the_worker():
    measured = profile(*gpu_with_cpu().devices, transfers=[transfer("cuda:0", "cpu", 0.002, 0.001, pinned=False)])
    plan = make_plan(measured, 100)
    # Pageable copies block the host: T_main = 0.02 + 0.001 + 0.003 = 0.024, budget
    # 0.95 * 0.024 = 0.0228. The worker starts after the first copy:
    # 0.002 + 0.001 b + 0.003 <= 0.0228 -> b <= 17.8 -> 17 (cpu/2t: 8.9 -> 8, cpu/1t: 4.45 -> 4).
    assert plan.perturbation_batch_size == 17
    p = plan.predictions
    assert p.transfer_time_s == pytest.approx(0.003)
    assert p.main_time_s == pytest.approx(0.024) and p.asam_step_s == pytest.approx(0.024)
    assert p.perturbation_time_s == pytest.approx(0.022)
    assert p.hidden_fraction == pytest.approx((0.041 - 0.024) / (0.041 - 0.021))
    assert p.transfer == "measured"
    assert [(a.perturbation.key, a.perturbation_batch_size) for a in plan.alternatives] == [("cpu/2t", 8), ("cpu/1t", 4)]
    assert "transfer times are those measured with pageable host memory" in plan.notes


def test_the_handover_to_a_cpu_worker_lengthens_the_main_step_and_the_budget():
    measured = profile(*gpu_with_cpu().devices, handovers=[handover("cuda:0", "cpu/4t", 0.002, iqr=0.0005)])
    plan = make_plan(measured, 100)
    # T_main = 0.021 + 0.002 = 0.023, budget 0.95 * 0.023 = 0.02185. The worker's time is its
    # own: 0.002 + 0.001 b <= 0.02185 -> b <= 19.85 -> 19 (not 17 as without the handover).
    assert (plan.perturbation.key, plan.perturbation_batch_size) == ("cpu/4t", 19)
    p = plan.predictions
    assert p.main_time_s == pytest.approx(0.023) and p.asam_step_s == pytest.approx(0.023)
    assert p.perturbation_time_s == pytest.approx(0.021)
    assert p.hidden_fraction == pytest.approx((0.041 - 0.023) / (0.041 - 0.021))
    assert p.main_time_uncertainty_s == pytest.approx(0.0005)  # the handover's IQR; all else exact
    assert "the main step carries the measured handover cuda:0 -> cpu/4t (submit, collect, perturb and " \
           "restore): 2 ms, timed from weights in host memory: the main stream's waits for the gather and the " \
           "result's copy up are not in it (profile again to time them)" in plan.notes
    # cpu/2t's handover was not measured: it takes the same main's (cpu/4t's), 0.002 + 0.002 b
    # <= 0.02185 -> 9 (cpu/1t: 0.002 + 0.004 b -> 4).
    alternatives = [(a.perturbation.key, a.perturbation_batch_size, a.predictions.main_time_s)
                    for a in plan.alternatives]
    assert alternatives == [("cpu/2t", 9, pytest.approx(0.023)), ("cpu/1t", 4, pytest.approx(0.023))]


def test_a_handover_timed_from_the_gpus_weights_holds_the_pageable_copies_and_says_so():
    # Pageable transfers block the host: from host weights they are added to the main step
    # (test_pageable_transfers_...); timed from the GPU's weights the handover holds them already.
    transfers = [transfer("cuda:0", "cpu/4t", 0.001, 0.001, pinned=False)]
    host = profile(*gpu_with_cpu().devices, transfers=transfers,
                   handovers=[handover("cuda:0", "cpu/4t", 0.002)])
    on_gpu = profile(*gpu_with_cpu().devices, transfers=transfers,
                     handovers=[handover("cuda:0", "cpu/4t", 0.002).model_copy(update={"weights_on": "cuda:0"})])
    assert make_plan(host, 100).predictions.main_time_s == pytest.approx(0.021 + 0.002 + 0.002)
    plan = make_plan(on_gpu, 100)
    assert plan.predictions.main_time_s == pytest.approx(0.021 + 0.002)
    # The worker's path keeps the weights' copy; the result's copy up is the main stream's wait,
    # in the handover (from host weights the worker's path has both).
    assert plan.predictions.perturbation_time_s == pytest.approx(0.002 + 0.001 * plan.perturbation_batch_size + 0.001)
    assert make_plan(host, 100).predictions.perturbation_time_s == pytest.approx(
        0.002 + 0.001 * make_plan(host, 100).perturbation_batch_size + 0.002)
    assert any(n.endswith("2 ms, timed from the weights on cuda:0 (the gather and the result's copy up included)")
               for n in plan.notes)


def test_a_handover_measured_for_another_worker_stands_in_and_the_plan_says_so():
    measured = profile(*gpu_with_cpu().devices, handovers=[handover("cuda:0", "cpu/2t", 0.002)])
    plan = make_plan(measured, 100)
    assert (plan.perturbation.key, plan.perturbation_batch_size) == ("cpu/4t", 19)
    assert plan.predictions.main_time_s == pytest.approx(0.023)
    assert ("the handover cuda:0 -> cpu/4t was not measured: the main step carries the 2 ms measured for "
            "cuda:0 -> cpu/2t") in plan.notes


def test_another_gpu_as_worker_has_no_handover():
    devices = [affine("cuda:0", 0.01, 0.0001), affine("cuda:1", 0.002, 0.0001)]
    measured = profile(*devices, handovers=[handover("cuda:0", "cpu/1t", 0.002)])
    plan = make_plan(measured, 100, main_device="cuda:0")
    # Its worker is a thread of the main process: T_main stays 0.021.
    assert plan.perturbation.key == "cuda:1"
    assert plan.predictions.main_time_s == pytest.approx(0.021)
    assert not any("handover" in n for n in plan.notes)


def test_exact_transfer_keys_win_over_same_device_ones():
    # Pageable: the transfers count in the main step too, where the key's figure shows.
    measured = profile(*gpu_with_cpu().devices, transfers=[transfer("cuda:0", "cpu", 0.002, 0.001, pinned=False),
                                                            transfer("cuda:0", "cpu/4t", 0.001, 0.001, pinned=False)])
    plan = make_plan(measured, 100)
    # cpu/4t's own 0.002: T_main = 0.021 + 0.002 = 0.023, budget 0.02185;
    # 0.002 + 0.001 b + 0.002 <= 0.02185 -> 17. cpu/2t takes the 0.003 of "cpu": T_main 0.024.
    assert (plan.perturbation.key, plan.perturbation_batch_size) == ("cpu/4t", 17)
    assert plan.predictions.transfer_time_s == pytest.approx(0.002)
    assert plan.predictions.main_time_s == pytest.approx(0.023)
    slower = next(a for a in plan.alternatives if a.perturbation.key == "cpu/2t")
    assert slower.predictions.main_time_s == pytest.approx(0.024)


def test_transfers_to_another_gpu_stay_off_the_main_step():
    devices = [affine("cuda:0", 0.01, 0.0001), affine("cuda:1", 0.002, 0.0001)]
    plan = make_plan(profile(*devices, transfers=[transfer("cuda:0", "cuda:1", 0.002, 0.001)]), 100,
                     main_device="cuda:0")
    # Only a CPU worker's copies run on the main thread: T_main stays 0.021, budget 0.01995;
    # 0.002 + 0.0001 b + 0.003 <= 0.01995 -> b <= 149.5 -> B = 100.
    assert (plan.perturbation.key, plan.perturbation_batch_size) == ("cuda:1", 100)
    assert plan.predictions.main_time_s == pytest.approx(0.021)
    assert plan.predictions.perturbation_time_s == pytest.approx(0.002 + 0.01 + 0.003)
    # No host memory in a GPU-to-GPU copy: nothing pinned or pageable to speak of.
    assert "transfer times are those measured between cuda:0 and cuda:1" in plan.notes
    assert not any("pinned" in n or "pageable" in n for n in plan.notes)


def test_contention_lengthens_the_main_step_and_the_budget_with_it():
    measured = profile(*gpu_with_cpu().devices, contention=[contention("cuda:0", "cpu/4t", 1.2)])
    plan = make_plan(measured, 100)
    # Only cpu/4t slows the main step: T_main = 0.02 * 1.2 + 0.001 = 0.025 (19% slower) while
    # cpu/2t (b_p 8) keeps 0.021, so the quieter worker wins despite its smaller b_p.
    assert plan.perturbation.key == "cpu/2t" and plan.perturbation_batch_size == 8
    slowed = next(a for a in plan.alternatives if a.perturbation.key == "cpu/4t")
    # Budget 0.95 * 0.025 = 0.02375: 0.002 + 0.001 b <= 0.02375 -> 21.
    assert slowed.perturbation_batch_size == 21
    assert slowed.predictions.asam_step_s == pytest.approx(0.025)
    assert slowed.predictions.hidden_fraction == pytest.approx((0.041 - 0.025) / 0.020)
    assert slowed.predictions.contention == "measured"


def test_slight_contention_within_the_equivalence_band_keeps_the_larger_b_p():
    measured = profile(*gpu_with_cpu().devices, contention=[contention("cuda:0", "cpu/4t", 1.02)])
    plan = make_plan(measured, 100)
    # T_main = 0.0204 + 0.001 = 0.0214, within 3% of 0.021; budget 0.02033 -> b_p 18.
    assert plan.perturbation.key == "cpu/4t" and plan.perturbation_batch_size == 18
    assert plan.predictions.main_time_s == pytest.approx(0.0214)


def test_oom_caps_b_p_below_the_first_failing_batch():
    devices = [affine("cuda:0", 0.01, 0.0001), affine("cpu/4t", 0.002, 0.001, oom_from=16)]
    plan = make_plan(profile(*devices), 100)
    assert plan.perturbation_batch_size == 15


def test_infeasible_gives_non_blocking_with_its_staleness():
    devices = [affine("cuda:0", 0.01, 0.0001), affine("cpu/1t", 0.05, 0.004)]
    plan = make_plan(profile(*devices), 100)
    # T_pert(1) = 0.054 > 0.01995: s = ceil(0.054 / 0.01995) = 3; 0.05 + 0.004 b <= 0.05985 -> 2.
    assert (plan.mode, plan.feasible, plan.staleness) == ("non_blocking", False, 3)
    assert plan.perturbation_batch_size == 2
    assert plan.predictions.asam_step_s == pytest.approx(0.021)  # never waits
    assert "staleness 3" in plan.verdict and "no device hides even b_p=1" in plan.verdict


def test_fastest_gpu_is_the_default_main_and_the_other_gpu_a_candidate():
    devices = [affine("cuda:0", 0.01, 0.0001), affine("cuda:1", 0.005, 0.00005), affine("cpu/4t", 0.002, 0.001)]
    plan = make_plan(profile(*devices), 100)
    # cuda:1: T_main = 0.005 + 0.005 + 0.001 = 0.011, budget 0.01045.
    assert plan.main_device == "cuda:1"
    assert plan.predictions.sgd_step_s == pytest.approx(0.011)
    # cpu/4t: 0.002 + 0.001 b <= 0.01045 -> 8; cuda:0: 0.01 + 0.0001 b <= 0.01045 -> 4.
    assert (plan.perturbation.key, plan.perturbation_batch_size) == ("cpu/4t", 8)
    assert [(a.perturbation.key, a.perturbation_batch_size) for a in plan.alternatives] == [("cuda:0", 4)]


def test_gpu_perturbation_wins_a_b_p_tie_by_needing_no_cpu_cores():
    devices = [affine("cuda:0", 0.01, 0.0001), affine("cuda:1", 0.001, 0.0001), affine("cpu/4t", 0.001, 0.0001)]
    plan = make_plan(profile(*devices), 100, main_device="cuda:0")
    # Both hide all of B = 100; cuda:1 uses no CPU core.
    assert (plan.perturbation.key, plan.perturbation_batch_size) == ("cuda:1", 100)
    assert plan.perturbation.cores is None


def test_second_stream_needs_measured_contention():
    devices = list(gpu_with_cpu().devices) + [affine("cuda:0+stream", 0.012, 0.0001)]
    unmeasured = make_plan(profile(*devices), 100)
    assert all(a.perturbation.key != "cuda:0+stream" for a in unmeasured.alternatives)
    assert any("second stream on cuda:0 was not considered" in n for n in unmeasured.notes)

    quiet = make_plan(profile(*devices, contention=[contention("cuda:0", "cuda:0+stream", 1.0)]), 100)
    # 0.012 + 0.0001 b <= 0.01995 -> 79 > 17: the stream wins.
    assert quiet.perturbation.key == "cuda:0+stream" and quiet.perturbation.secondary_stream
    assert quiet.perturbation_batch_size == 79
    assert quiet.predictions.transfer == "not_applicable"


def test_explicit_main_device_and_unknown_ones():
    devices = [affine("cuda:0", 0.01, 0.0001), affine("cuda:1", 0.005, 0.00005), affine("cpu/4t", 0.002, 0.001)]
    assert make_plan(profile(*devices), 100, main_device="cuda:0").main_device == "cuda:0"
    with pytest.raises(UserInputError, match="'cuda:7'"):
        make_plan(profile(*devices), 100, main_device="cuda:7")


def test_reserved_cores_shrink_the_worker():
    plan = make_plan(gpu_with_cpu(), 100, reserved_cores=4)
    # 8 cores - 1 main - 4 reserved = 3 for the worker: cpu/2t.
    assert (plan.perturbation.key, plan.perturbation_batch_size) == ("cpu/2t", 8)
    assert plan.perturbation.cores == (5, 6)


def test_worker_cores_nearest_the_gpu_first():
    plan = make_plan(gpu_with_cpu(nearest=(4, 5, 6, 7)), 100)
    assert plan.perturbation.cores == (5, 6, 7, 0)


def test_ranks_divide_the_cores_and_leave_pinning_to_the_runtime():
    plan = make_plan(gpu_with_cpu(), 100, nproc_per_node=2)
    # 4 cores per rank, 1 for the main process: cpu/2t.
    assert (plan.perturbation.key, plan.perturbation.cores) == ("cpu/2t", None)
    assert plan.nproc_per_node == 2
    assert any("not pinned" in n for n in plan.notes)


def test_no_core_left_for_a_worker_gives_synchronous_sam():
    plan = make_plan(gpu_with_cpu(cores=1), 100)
    assert (plan.mode, plan.staleness, plan.feasible) == ("synchronous", 0, False)
    assert plan.perturbation.key == "cuda:0" and plan.perturbation_batch_size == 100
    assert plan.predictions.asam_step_s == pytest.approx(plan.predictions.sam_step_s)
    assert "use synchronous SAM" in plan.verdict


cpu_only = cpu_only_profile


def test_cpu_only_split_by_hand():
    # 8 cores, fwd_bwd = 0.001 + slope_t * b with SUBLINEAR slopes, opt 0.001.
    plan = make_plan(cpu_only(), 64)
    # Baseline on 8 threads: fwd_bwd 0.001 + 0.1152 = 0.1162 -> T_SGD 0.1172, T_SAM 0.2334.
    # Main 4t: T_main = 0.001 + 0.1664 + 0.001 = 0.1684, budget 0.15998;
    # worker 4t: 0.001 + 0.0026 b <= 0.15998 -> 61 (2t: 35, 1t: 19, same step time).
    assert (plan.main_device, plan.main_cores) == ("cpu/4t", 4)
    assert (plan.perturbation.key, plan.perturbation_batch_size) == ("cpu/4t", 61)
    assert plan.perturbation.cores == (4, 5, 6, 7)
    p = plan.predictions
    assert p.sgd_step_s == pytest.approx(0.1172) and p.sam_step_s == pytest.approx(0.2334)
    assert p.asam_step_s == pytest.approx(0.1684)
    assert p.hidden_fraction == pytest.approx((0.2334 - 0.1684) / (0.2334 - 0.1172))
    assert plan.mode == "staleness1"


def test_cpu_only_handover_by_hand_and_for_an_unmeasured_split():
    measured = cpu_only(handovers=[handover("cpu/4t", "cpu/4t", 0.005)])
    plan = make_plan(measured, 64)
    # Main 4t: T_main = 0.1684 + 0.005 = 0.1734, budget 0.16473; worker 4t: 0.001 + 0.0026 b
    # <= 0.16473 -> b <= 62.97 -> 62 (61 without the handover).
    assert (plan.main_device, plan.perturbation.key, plan.perturbation_batch_size) == ("cpu/4t", "cpu/4t", 62)
    assert plan.predictions.main_time_s == pytest.approx(0.1734)
    # The profiler measures the handover only for its own split; another main on the CPU takes
    # it rather than nothing: main 2t: T_main = 0.290 + 0.005 = 0.295, budget 0.28025; worker
    # 4t: 0.001 + 0.0026 b <= 0.28025 -> 107, capped at B = 64.
    other = make_plan(measured, 64, main_device="cpu/2t", asynchronous=True)
    assert (other.perturbation.key, other.perturbation_batch_size) == ("cpu/4t", 64)
    assert other.predictions.main_time_s == pytest.approx(0.295)
    assert ("the handover cpu/2t -> cpu/4t was not measured: the main step carries the 5 ms measured for "
            "cpu/4t -> cpu/4t") in other.notes


def test_cpu_only_contention_slows_the_worker_as_much_as_the_main_process():
    # 2 cores, main cpu/1t and worker cpu/1t, both fwd_bwd = 0.001 + 0.008 b, opt 0.001.
    # Measured: the main step is 1.5x slower while the worker computes. Two CPU processes share
    # memory bandwidth, so the worker is taken to be 1.5x slower too:
    # T_main = 1.5 * 0.801 + 0.001 = 1.2025, budget 0.95 * 1.2025 = 1.142375;
    # 1.5 * (0.001 + 0.008 b) <= 1.142375 -> b <= 95.06 -> b_p = 95 (not 100, as if unslowed).
    slowed = cpu_only_profile({1: 0.008, 2: 0.0045}, cores=2,
                              contention=[contention("cpu/1t", "cpu/1t", 1.5, batch_size=100)])
    honest = make_plan(slowed, 100, main_device="cpu/1t")
    # SAM on both cores (2 * 0.451 + 0.001 = 0.903 s) beats the split: the plan says so ...
    assert honest.mode == "synchronous" and "not worth it" in honest.verdict
    assert (honest.alternatives[0].perturbation.key, honest.alternatives[0].perturbation_batch_size) == ("cpu/1t", 95)
    # ... and plans the split when asked to, noting the cost.
    plan = make_plan(slowed, 100, main_device="cpu/1t", asynchronous=True)
    assert (plan.mode, plan.perturbation.key, plan.perturbation_batch_size) == ("staleness1", "cpu/1t", 95)
    assert plan.predictions.main_time_s == pytest.approx(1.2025)
    assert any("synchronous SAM on cpu/2t is predicted faster" in note for note in plan.notes)


def test_cpu_only_reserved_cores_change_the_baseline_too():
    plan = make_plan(cpu_only(), 64, reserved_cores=2)
    # 6 free cores: SGD/SAM on 4 threads (0.1684 / 0.3358); split 4 + 2: b_p 35, hidden fully.
    assert (plan.main_device, plan.perturbation.key, plan.perturbation_batch_size) == ("cpu/4t", "cpu/2t", 35)
    assert plan.predictions.sam_step_s == pytest.approx(0.3358)
    assert plan.predictions.hidden_fraction == pytest.approx(1.0)


def test_cpu_only_says_when_asynchronous_sam_is_not_worth_it():
    # Two threads are four times as fast as one: splitting the cores loses to SAM on both.
    plan = make_plan(cpu_only({1: 0.002, 2: 0.0005}, cores=2), 64)
    # SAM on 2t: 2 * 0.033 + 0.001 = 0.067; best split 1 + 1: T_main = 0.129 + 0.001 = 0.130.
    assert (plan.mode, plan.main_device, plan.perturbation.key) == ("synchronous", "cpu/2t", "cpu/2t")
    assert plan.feasible  # the split would hide the perturbation, but the step is slower
    assert "not worth it" in plan.verdict
    assert plan.predictions.asam_step_s == pytest.approx(0.067)
    assert plan.alternatives[0].predictions.asam_step_s == pytest.approx(0.130)
    assert plan.alternatives[0].predictions.hidden_fraction < 0


def test_cpu_only_fixed_main_threads():
    plan = make_plan(cpu_only(), 64, main_device="cpu/4t", reserved_cores=1)
    # 7 free cores; main 4t: budget 0.15998, worker 2t: 0.001 + 0.0045 b -> 35 (4t does not fit).
    assert (plan.main_device, plan.perturbation.key, plan.perturbation_batch_size) == ("cpu/4t", "cpu/2t", 35)
    # SAM on the 4 threads that fit in 7: 2 * 0.1674 + 0.001.
    assert plan.predictions.sam_step_s == pytest.approx(0.3358)


def test_cpu_only_fixed_main_slower_than_sam_on_all_cores():
    plan = make_plan(cpu_only(), 64, main_device="cpu/2t")
    # Main 2t: T_main = 0.001 + 0.288 + 0.001 = 0.290 > SAM on 8 threads, 0.2334.
    assert (plan.mode, plan.main_device) == ("synchronous", "cpu/8t")
    # The split is still listed: worker 4t: 0.001 + 0.0026 b <= 0.2755 -> 64 = B (2t also
    # reaches 61, 1t 34: the largest b_p wins).
    best = plan.alternatives[0]
    assert (best.main_device, best.perturbation.key, best.perturbation_batch_size) == ("cpu/2t", "cpu/4t", 64)
    assert best.predictions.asam_step_s == pytest.approx(0.290)


def test_unknown_usable_cores_fall_back_to_the_largest_thread_count():
    plan = make_plan(cpu_only(cores=None), 64)
    assert plan.perturbation.cores is None
    assert any("does not record the usable cores" in n for n in plan.notes)


@pytest.mark.parametrize("kwargs, bad", [
    (dict(batch_size=0), "0"), (dict(batch_size=True), "True"), (dict(batch_size=2.5), "2.5"),
    (dict(margin=1.0), "1.0"), (dict(margin=-0.1), "-0.1"), (dict(reserved_cores=-1), "-1"),
    (dict(nproc_per_node=0), "0"), (dict(reserved_cores=8), "8"), (dict(nproc_per_node=9), "9"),
])
def test_bad_inputs_are_user_errors_with_the_value(kwargs, bad):
    arguments = dict(batch_size=100) | kwargs
    with pytest.raises(UserInputError, match=bad):
        make_plan(gpu_with_cpu(), arguments.pop("batch_size"), **arguments)


# Properties. Uniform contention: the choice is then by b_p among equally fast candidates.

affine_a = st.floats(1e-4, 0.05)
affine_b = st.floats(1e-6, 0.01)


@settings(max_examples=80, deadline=None)
@given(affine_a, affine_b, affine_a, affine_b, st.floats(0.05, 1.0), st.integers(1, 600))
def test_a_faster_perturbation_device_never_gives_a_smaller_b_p(ma, mb, ca, cb, factor, batch):
    slow = make_plan(profile(affine("cuda:0", ma, mb), affine("cpu/4t", ca, cb)), batch)
    fast = make_plan(profile(affine("cuda:0", ma, mb), affine("cpu/4t", ca * factor, cb * factor)), batch)
    assert fast.staleness <= slow.staleness
    if fast.staleness == slow.staleness:
        assert fast.perturbation_batch_size >= slow.perturbation_batch_size


@settings(max_examples=80, deadline=None)
@given(affine_a, affine_b, st.integers(1, 500), st.integers(0, 500), st.sampled_from([1, 2, 4]))
def test_a_larger_batch_never_gives_a_smaller_b_p(ma, mb, batch, extra, divisor):
    machine = gpu_with_cpu({t: s / divisor for t, s in {1: 0.004, 2: 0.002, 4: 0.001}.items()})
    machine = profile(affine("cuda:0", ma, mb), *machine.devices[1:])
    small, large = make_plan(machine, batch), make_plan(machine, batch + extra)
    assume(small.feasible and large.feasible)
    assert large.perturbation_batch_size >= small.perturbation_batch_size


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 8), st.integers(0, 8), st.integers(1, 400))
def test_more_cores_never_need_more_time(cores, extra, batch):
    fewer, more = make_plan(gpu_with_cpu(cores=cores), batch), make_plan(gpu_with_cpu(cores=cores + extra), batch)
    assert more.predictions.asam_step_s <= fewer.predictions.asam_step_s * (1 + EQUIVALENT_STEP_TIME)
    assert more.staleness <= fewer.staleness or fewer.mode == "synchronous"
    if more.staleness == fewer.staleness:
        assert more.perturbation_batch_size >= fewer.perturbation_batch_size


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(0, 4), st.integers(1, 300))
def test_more_cores_never_slow_a_cpu_only_plan_beyond_the_band(cores, extra, batch):
    fewer, more = make_plan(cpu_only(cores=2 * cores), batch), make_plan(cpu_only(cores=2 * (cores + extra)), batch)
    assert more.predictions.asam_step_s <= fewer.predictions.asam_step_s * (1 + EQUIVALENT_STEP_TIME)


def test_cpus_needed_by_hand():
    machine = gpu_with_cpu()
    # b_p: cpu/1t 4, cpu/2t 8, cpu/4t 17; cpu/8t does not fit in 8 - 1 cores.
    expected = {1: (1, 4), 4: (1, 4), 5: (2, 8), 9: (4, 17), 17: (4, 17)}
    for minimum, (cores, b_p) in expected.items():
        need = cpus_needed(machine, 100, min_perturbation_batch=minimum)
        assert (need.worker_cores, need.perturbation_batch_size, need.cores_per_rank) == (cores, b_p, cores + 1)
    none = cpus_needed(machine, 100, min_perturbation_batch=18)
    assert not none.feasible and none.worker_cores is None
    assert "b_p=17 on cpu/4t" in none.explanation


def test_cpus_needed_counts_machine_cores_per_rank():
    need = cpus_needed(gpu_with_cpu(cores=16), 100, min_perturbation_batch=30)
    # cpu/8t: 0.002 + 0.0005 b <= 0.01995 -> 35.
    assert (need.worker_cores, need.perturbation_batch_size, need.cores_per_rank) == (8, 35, 9)
    halved = cpus_needed(gpu_with_cpu(cores=16), 100, min_perturbation_batch=30, nproc_per_node=2)
    assert not halved.feasible


def test_cpus_needed_on_a_cpu_only_profile_wants_the_main_threads():
    with pytest.raises(UserInputError, match="main_device"):
        cpus_needed(cpu_only(), 64)
    need = cpus_needed(cpu_only(), 64, main_device="cpu/4t")
    # Budget 0.15998: 1t -> 19 hides b_p >= 1 with one core; cores per rank 4 + 1.
    assert (need.worker_cores, need.perturbation_batch_size, need.cores_per_rank) == (1, 19, 5)


def test_cpus_needed_explains_when_nothing_hides_even_one_sample():
    machine = profile(affine("cuda:0", 0.01, 0.0001), affine("cpu/1t", 0.05, 0.004))
    need = cpus_needed(machine, 100)
    assert not need.feasible and "staleness 3" in need.explanation


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 400), st.integers(0, 400), st.integers(1, 60), st.integers(0, 60))
def test_cpus_needed_is_monotone(batch, extra, minimum, more_minimum):
    assume(minimum + more_minimum <= batch)
    machine = gpu_with_cpu(cores=16)
    base = cpus_needed(machine, batch, min_perturbation_batch=minimum)
    stricter = cpus_needed(machine, batch, min_perturbation_batch=minimum + more_minimum)
    larger_batch = cpus_needed(machine, batch + extra, min_perturbation_batch=minimum)
    if stricter.feasible:
        assert base.feasible and stricter.worker_cores >= base.worker_cores
    if base.feasible:
        assert larger_batch.feasible and larger_batch.worker_cores <= base.worker_cores


def test_hidden_fraction_and_speedup_follow_their_definitions():
    plan = make_plan(cpu_only(), 64)
    for p in [plan.predictions] + [a.predictions for a in plan.alternatives]:
        assert p.hidden_fraction == pytest.approx((p.sam_step_s - p.asam_step_s) / (p.sam_step_s - p.sgd_step_s))
        assert p.speedup_over_sam == pytest.approx(p.sam_step_s / p.asam_step_s)
        assert math.isfinite(p.main_time_uncertainty_s)
