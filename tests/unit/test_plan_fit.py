"""A plan must fit the model and the batch it is used with (the issue's MNIST-1D plan used for a
20-64-5 MLP at batch 32)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from asam_tune.costmodel.planner import make_plan
from asam_tune.errors import UserInputError
from asam_tune.runtime.plan_fit import check_model, check_plan_fits, fit_batch_size, model_signature
from asam_tune.workloads import describe, load_workload
from tests.fixtures.costmodel_profiles import cpu_only_profile


def _mnist1d_plan(batch_size: int = 100):
    """A plan made from a profile of the real MNIST-1D CNN (its descriptor as the profiler writes it)."""
    workload = load_workload("mnist1d-cnn")
    machine = cpu_only_profile({1: 0.008, 2: 0.0045}, cores=2)
    machine = machine.model_copy(update={"workload": describe(workload, workload.build())})
    return make_plan(machine, batch_size, main_device="cpu/1t", asynchronous=True)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))


def test_the_plans_own_model_fits_at_its_batch_size():
    plan = _mnist1d_plan()
    fit = check_plan_fits(plan, load_workload("mnist1d-cnn").build(), plan.batch_size)
    assert (fit.perturbation_batch_size, fit.warning) == (plan.perturbation_batch_size, None)


def test_another_model_is_a_one_line_error_with_the_fix():
    plan = _mnist1d_plan()
    with pytest.raises(UserInputError) as caught:
        check_plan_fits(plan, _mlp(), 32)
    message = str(caught.value)
    assert "\n" not in message
    assert "the plan is for model 'mnist1d-cnn'" in message and "a different number of parameters" in message
    assert f"{plan.workload.parameter_count:,} parameters" in message and "1,669 parameters" in message
    assert "asam-tune profile --model" in message and "asam-tune plan" in message


def test_same_count_other_shapes_is_caught_by_the_hash():
    plan = _mnist1d_plan()
    model = load_workload("mnist1d-cnn").build()
    renamed = nn.ModuleDict({"renamed": model})  # same parameters, other names
    assert model_signature(renamed).parameter_count == plan.workload.parameter_count
    with pytest.raises(UserInputError, match="the same number of parameters but other names or shapes"):
        check_model(plan, renamed)


def test_the_model_may_be_given_as_its_parameters():
    plan = _mnist1d_plan()
    model = load_workload("mnist1d-cnn").build()
    check_model(plan, model.named_parameters())  # names: count and hash compared
    check_model(plan, list(model.parameters()))  # no names: the count only
    with pytest.raises(UserInputError, match="a different number of parameters"):
        check_model(plan, list(_mlp().parameters()))
    with pytest.raises(UserInputError, match="expected an nn.Module"):
        check_model(plan, ["weights"])


def test_the_signature_is_the_profilers():
    workload = load_workload("mnist1d-cnn")
    model = workload.build()
    recorded = describe(workload, model)
    signature = model_signature(model)
    assert (signature.parameter_count, signature.parameter_shapes_hash) == \
        (recorded.parameter_count, recorded.parameter_shapes_hash)


@pytest.mark.parametrize("batch_size, expected", [(32, 8), (200, 50), (1, 1), (3, 1)])
def test_another_batch_size_rescales_b_p_with_a_warning(batch_size, expected):
    plan = _mnist1d_plan().model_copy(update={"perturbation_batch_size": 25})
    fit = fit_batch_size(plan, batch_size)
    assert fit.perturbation_batch_size == expected
    assert fit.warning.startswith(f"the plan is for batch size 100, this run's batches have {batch_size}: "
                                  f"b_p scaled from 25 to {expected}")
    assert f"--batch-size {batch_size}" in fit.warning and "\n" not in fit.warning


def test_a_whole_batch_plan_stays_whole():
    plan = _mnist1d_plan().model_copy(update={"perturbation_batch_size": 100})
    assert fit_batch_size(plan, 64).perturbation_batch_size == 64


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "32"])
def test_a_bad_batch_size_is_refused(bad):
    with pytest.raises(UserInputError, match="Invalid batch size"):
        fit_batch_size(_mnist1d_plan(), bad)


def test_a_plan_like_object_without_a_workload_is_not_checked():
    class Minimal:
        perturbation_batch_size = 4

    check_model(Minimal(), _mlp())
    assert fit_batch_size(Minimal(), 16).perturbation_batch_size == 4
    assert fit_batch_size(Minimal(), 2).perturbation_batch_size == 2


def test_tensors_without_grad_count_too():
    model = _mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    assert model_signature(model).parameter_count == sum(p.numel() for p in model.parameters())
    assert torch.is_tensor(next(model.parameters()))
