"""The synthetic GPU profile: made reproducibly from a real CPU profile, marked synthetic, and
the plan made from it keeps the quality floor."""
from __future__ import annotations

from pathlib import Path

import pytest

from asam_tune.costmodel import make_plan
from asam_tune.costmodel.quality import DEFAULT_FLOORS, floor_batch
from asam_tune.costmodel.synthetic import PCIE_BYTES_PER_S, PCIE_LATENCY_S, main, synthetic_gpu_profile
from asam_tune.errors import UserInputError
from asam_tune.records import Profile, load_record

PROFILES = Path(__file__).resolve().parents[2] / "profiles"
SHIPPED = [("cpu-2core-mnist1d-cnn", "synthetic-gpu30x-mnist1d-cnn", 100),
           ("cpu-2core-resnet20", "synthetic-gpu30x-resnet20", 128),
           ("cpu-2core-seq-transformer", "synthetic-gpu30x-seq-transformer", 100)]


@pytest.mark.parametrize("source, synthetic, batch", SHIPPED)
def test_the_shipped_synthetic_profiles_are_what_the_script_makes(tmp_path, source, synthetic, batch):
    assert main([str(PROFILES / f"{source}.json"), "--speedup", "30", "-o", str(tmp_path / "s.json")]) == 0
    assert (tmp_path / "s.json").read_text() == (PROFILES / f"{synthetic}.json").read_text()


def test_the_gpu_is_thirty_times_one_core_and_marked_synthetic():
    source = load_record(Profile, PROFILES / "cpu-2core-mnist1d-cnn.json")
    made = synthetic_gpu_profile(source, 30)
    core, gpu = source.device("cpu/1t"), made.device("cuda:0")
    for a, b in zip(core.ok_points(), gpu.ok_points()):
        assert b.batch_size == a.batch_size
        assert b.forward_backward.median_s == pytest.approx(a.forward_backward.median_s / 30)
        assert b.optimizer_step.median_s == pytest.approx(a.optimizer_step.median_s / 30)
    assert "SYNTHETIC" in made.fingerprint.gpus[0].name and "SYNTHETIC" in made.fingerprint.platform
    assert made.fingerprint.gpus[0].uuid == "synthetic"
    transfer = next(t for t in made.transfers if t.source == "cuda:0" and t.target == "cpu/1t")
    assert transfer.to_target.median_s == pytest.approx(PCIE_LATENCY_S + transfer.parameter_bytes / PCIE_BYTES_PER_S)
    assert [(h.main, h.perturbation) for h in made.handovers][0] == ("cuda:0", "cpu/1t")
    assert made.devices[1:] == source.devices  # the measured CPU configurations are untouched


@pytest.mark.parametrize("synthetic, batch", [("synthetic-gpu30x-mnist1d-cnn", 100),
                                               ("synthetic-gpu30x-seq-transformer", 100)])
def test_for_a_small_model_one_core_beside_the_gpu_costs_more_than_sam_and_the_plan_says_so(synthetic, batch):
    plan = make_plan(load_record(Profile, PROFILES / f"{synthetic}.json"), batch)
    q = plan.quality
    assert q.min_perturbation_batch_size == floor_batch(DEFAULT_FLOORS["power"][0], batch)
    # The GPU's step is shorter than one core's pass on a few samples plus the handover: even at
    # the floor asynchronous SAM is slower than SAM, so the plan is synchronous SAM, and says why.
    assert plan.mode == "synchronous" and "synchronous SAM is the honest choice" in plan.verdict
    assert plan.trade.keeps_gain.perturbation_batch_size == q.min_perturbation_batch_size
    assert plan.trade.keeps_gain.asam_step_s > plan.predictions.sam_step_s


def test_for_resnet20_the_plan_keeps_the_gain_below_sams_cost():
    plan = make_plan(load_record(Profile, PROFILES / "synthetic-gpu30x-resnet20.json"), 128)
    q = plan.quality
    assert plan.mode == "staleness1" and (plan.main_device, plan.perturbation.key) == ("cuda:0", "cpu/1t")
    assert plan.perturbation_batch_size >= q.min_perturbation_batch_size == floor_batch(DEFAULT_FLOORS["power"][0], 128)
    assert plan.predictions.asam_step_s < plan.predictions.sam_step_s
    assert q.expected_gain.value >= 0.9 and plan.trade.chosen == "keeps_gain"


def test_a_measured_floor_of_six_percent_is_partial_and_cheaper_than_sam_for_resnet20():
    plan = make_plan(load_record(Profile, PROFILES / "synthetic-gpu30x-resnet20.json"), 128,
                     min_perturbation_fraction=0.06)
    assert (plan.main_device, plan.perturbation.key, plan.perturbation_batch_size) == ("cuda:0", "cpu/1t", 8)
    assert plan.hiding == "partial" and plan.predictions.asam_step_s < plan.predictions.sam_step_s


def test_bad_sources_and_speedups(tmp_path):
    source = load_record(Profile, PROFILES / "cpu-2core-mnist1d-cnn.json")
    with pytest.raises(UserInputError, match="speedup"):
        synthetic_gpu_profile(source, 1)
    with pytest.raises(UserInputError, match="CPU-only"):
        synthetic_gpu_profile(synthetic_gpu_profile(source, 30), 30)
    assert main([str(tmp_path / "absent.json"), "-o", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()
