"""The ascent's dtype from profile to plan to runtime: measured under autocast, planned on those
times, run in that dtype (``AsyncSAM``'s ``ascent_dtype``) unless the user says otherwise."""
from __future__ import annotations

import functools
import json

import pytest
import torch
from torch import nn

from asam_tune import AsyncSAM
from asam_tune.costmodel import make_plan as make_plan_with_floor
from asam_tune.devices.torch_device import TorchComputeDevice
from asam_tune.errors import UserInputError
from asam_tune.profiler import probe
from asam_tune.records import DeviceConfig, Plan, Profile
from asam_tune.records.profile import ascent_dtype_name
from asam_tune.workloads import describe, load_workload
from tests.fixtures.costmodel_profiles import cpu_only_profile, gpu_with_cpu, points

make_plan = functools.partial(make_plan_with_floor, min_perturbation_fraction=None)


def with_ascent(profile: Profile, dtype: str, speedup: float, keys: set[str]) -> Profile:
    """``profile`` with ``keys``' ascent measured ``speedup`` times faster in ``dtype``."""
    devices = []
    for d in profile.devices:
        if d.config.key in keys:
            fast = points([(p.batch_size, p.forward_backward.median_s / speedup) for p in d.ok_points()],
                          d.ok_points()[0].optimizer_step.median_s)
            d = d.model_copy(update={"ascent_points": fast})
        devices.append(d)
    updated = profile.model_copy(update={"devices": tuple(devices), "ascent_dtype": dtype})
    return Profile.model_validate_json(updated.to_json())  # validated as a file would be


def test_ascent_dtype_names():
    assert ascent_dtype_name(None) is None
    assert [ascent_dtype_name(n) for n in ("bf16", "torch.bfloat16", "FP16", "half")] == \
        ["bfloat16", "bfloat16", "float16", "float16"]
    assert ascent_dtype_name(torch.bfloat16) == "bfloat16"
    with pytest.raises(UserInputError, match="unknown ascent dtype 'fp8'.*bfloat16 or float16"):
        ascent_dtype_name("fp8")


def test_ascent_points_need_the_profiles_ascent_dtype_and_unset_fields_keep_the_hash():
    base = gpu_with_cpu()
    doc = json.loads(base.to_json())
    assert "ascent_dtype" not in doc and all("ascent_points" not in d for d in doc["devices"])
    faster = with_ascent(base, "bfloat16", 2.0, {"cpu/4t"})
    assert faster.content_hash() != base.content_hash()
    broken = json.loads(faster.to_json())
    del broken["ascent_dtype"]
    with pytest.raises(ValueError, match="cpu/4t has ascent_points but the profile has no ascent_dtype"):
        Profile.model_validate_json(json.dumps(broken))


def test_the_plan_uses_the_ascent_times_measured_in_its_dtype_and_says_so():
    # cpu/4t: 0.002 + 0.001 b as measured in fp32, half that under bf16 autocast. Budget 0.01995
    # (test_planner.test_gpu_main_with_cpu_worker_by_hand): b <= 17.95 in fp32, 0.001 + 0.0005 b
    # <= 0.01995 -> b <= 37.9 in bf16.
    fp32 = make_plan(gpu_with_cpu(), 100)
    bf16 = make_plan(with_ascent(gpu_with_cpu(), "bfloat16", 2.0, {"cpu/4t", "cpu/2t", "cpu/1t", "cpu/8t"}), 100)
    assert (fp32.perturbation.key, fp32.perturbation_batch_size, fp32.ascent_dtype) == ("cpu/4t", 17, None)
    assert (bf16.perturbation.key, bf16.perturbation_batch_size, bf16.ascent_dtype) == ("cpu/4t", 37, "bfloat16")
    assert bf16.predictions.perturbation_time_s == pytest.approx(0.001 + 0.0005 * 37)
    # The main step is the main device's own (fp32) points: unchanged. SAM's ascent runs in
    # bf16 too (no ascent points on cuda:0 here: its own time) ...
    assert bf16.predictions.main_time_s == pytest.approx(fp32.predictions.main_time_s)
    assert bf16.predictions.sam_step_s == pytest.approx(fp32.predictions.sam_step_s)
    assert any("measured with its forward under autocast to bfloat16" in n for n in bf16.notes)
    # Round trip through the file format; a plan without it is written without the field.
    assert Plan.model_validate_json(bf16.to_json()) == bf16
    assert "ascent_dtype" not in json.loads(fp32.to_json())


def test_sams_baseline_takes_the_main_devices_ascent_in_the_ascent_dtype():
    # cuda:0: 0.01 + 0.0001 b, opt 0.001; its bf16 ascent twice as fast: SAM = 0.02 + 0.01 + 0.001.
    plan = make_plan(with_ascent(gpu_with_cpu(), "bfloat16", 2.0, {"cuda:0", "cpu/4t"}), 100)
    assert plan.predictions.sgd_step_s == pytest.approx(0.021)
    assert plan.predictions.sam_step_s == pytest.approx(0.031)


def test_a_candidate_without_ascent_points_keeps_its_own_times_and_the_plan_says_so():
    only_2t = with_ascent(gpu_with_cpu(), "bfloat16", 2.0, {"cpu/2t"})
    plan = make_plan(only_2t, 100)
    # cpu/2t in bf16: 0.001 + 0.001 b -> 18; cpu/4t in fp32 -> 17: the measured bf16 wins.
    assert (plan.perturbation.key, plan.perturbation_batch_size) == ("cpu/2t", 18)
    fallback = make_plan(with_ascent(gpu_with_cpu(), "bfloat16", 2.0, {"cpu/1t"}), 100)
    assert fallback.perturbation.key == "cpu/4t"
    assert any("ascent on cpu/4t was not measured in bfloat16" in n for n in fallback.notes)


def test_a_version_1_plan_cannot_carry_an_ascent_dtype():
    plan = make_plan(with_ascent(gpu_with_cpu(), "float16", 2.0, {"cpu/4t"}), 100)
    doc = json.loads(plan.to_json())
    old = {k: v for k, v in doc.items() if k not in ("rho_rule", "quality", "hiding", "trade", "profile_load")}
    old["schema_version"] = 1
    old["alternatives"] = [{k: v for k, v in a.items() if k != "hiding"} for a in old["alternatives"]]
    with pytest.raises(ValueError, match="version-1 plan has no ascent_dtype"):
        Plan.model_validate_json(json.dumps(old))


def test_the_compute_device_runs_its_forward_under_autocast_when_asked():
    workload = load_workload("mnist1d-cnn")
    seen = []

    def record(module, inputs, output):
        seen.append(output.dtype)

    for dtype, expected in ((None, torch.float32), ("bfloat16", torch.bfloat16)):
        model = workload.build()
        device = TorchComputeDevice(workload, DeviceConfig(device="cpu", threads=1), model=model,
                                    autocast_dtype=dtype)
        device.prepare(4)
        copy = device._model
        handle = next(m for m in copy.modules() if isinstance(m, (nn.Linear, nn.Conv1d))).register_forward_hook(record)
        device.forward_backward()
        handle.remove()
        assert seen[-1] == expected
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in copy.parameters())
        device.close()


def test_the_probe_builds_its_device_with_the_requests_autocast():
    request = {"workload": {"spec": "mnist1d-cnn", "input_shape": None, "num_classes": None},
               "config": {"device": "cpu", "threads": 1}}
    assert probe._device(request)._autocast is None
    assert probe._device({**request, "autocast": "float16"})._autocast is torch.float16


def test_async_sam_takes_the_plans_ascent_dtype_unless_told_otherwise(monkeypatch):
    plan = make_plan(with_ascent(cpu_only_profile(cores=2, slopes={1: 0.008}), "bfloat16", 2.0, {"cpu/1t"}), 100,
                     asynchronous=True)
    assert plan.ascent_dtype == "bfloat16"
    workload = load_workload("mnist1d-cnn")
    model = workload.build()
    plan = plan.model_copy(update={"workload": describe(workload, model)})  # made for this model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy
    kwargs = dict(plan=plan, allow_other_machine=True, perturbation_device=None, staleness=0)
    assert AsyncSAM(model, optimizer, loss, **kwargs).ascent_dtype == torch.bfloat16
    assert AsyncSAM(model, optimizer, loss, ascent_dtype=torch.float16, **kwargs).ascent_dtype == torch.float16
    assert AsyncSAM(model, optimizer, loss, ascent_dtype="parameters", **kwargs).ascent_dtype is None
    assert AsyncSAM(model, optimizer, loss).ascent_dtype is None
    with pytest.raises(UserInputError, match="Invalid ascent_dtype: 'fp8'"):
        AsyncSAM(model, optimizer, loss, ascent_dtype="fp8", **kwargs)


def test_async_sam_takes_the_names_the_cli_takes():
    from asam_tune.perturbers.ascent import check_ascent_dtype

    assert [check_ascent_dtype(n) for n in ("bf16", "FP16", "half", "torch.bfloat16")] == \
        [torch.bfloat16, torch.float16, torch.float16, torch.bfloat16]


def test_a_handover_point_weights_must_be_on_its_main_device():
    from tests.fixtures.costmodel_profiles import handover

    assert handover("cuda:0", "cpu/1t", 0.001).model_copy(update={"weights_on": "cuda:0"}).weights_on == "cuda:0"
    doc = json.loads(handover("cpu/2t", "cpu/1t", 0.001).to_json())
    from asam_tune.records.profile import HandoverPoint

    assert HandoverPoint.model_validate_json(json.dumps({**doc, "weights_on": "cpu"})).weights_on == "cpu"
    with pytest.raises(ValueError, match="weights_on 'cuda:0' is not the main device of 'cpu/2t'"):
        HandoverPoint.model_validate_json(json.dumps({**doc, "weights_on": "cuda:0"}))


def test_show_prints_the_ascent_points_and_the_plans_dtype():
    from asam_tune.cli.render import plan_tables, profile_tables

    profile = with_ascent(gpu_with_cpu(), "bfloat16", 2.0, {"cpu/4t"})
    titles = [t.title for t in profile_tables(profile)]
    assert "The ascent under autocast to bfloat16 (medians, --ascent-dtype)" in titles
    assert not any("autocast" in str(t.title) for t in profile_tables(gpu_with_cpu()))
    [ascent] = [t for t in profile_tables(profile) if "autocast" in str(t.title)]
    assert ascent.row_count == len(profile.device("cpu/4t").ascent_points)
    choice = plan_tables(make_plan(profile, 100))[0]
    assert "ascent dtype" in list(choice.columns[0].cells)
