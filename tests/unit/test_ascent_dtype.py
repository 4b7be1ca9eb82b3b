"""``ascent_dtype``: the ascent's forward under autocast in every worker; norm and scale in fp32."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asam_tune import AsyncSAM
from asam_tune.errors import UserInputError
from asam_tune.perturbers.ascent import ascent_perturbation, check_ascent_dtype, parameters_at, perturbed_indices
from asam_tune.perturbers.base import AscentJob, AscentTask
from asam_tune.perturbers.in_process import InProcessPerturber

RHO = 0.05


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


class RecordingLoss:
    """Cross-entropy that remembers the dtype of the model's output (bf16 under CPU autocast)."""

    def __init__(self):
        self.output_dtypes: list[torch.dtype] = []

    def __call__(self, model, batch):
        x, y = batch
        out = model(x)
        self.output_dtypes.append(out.dtype)
        return F.cross_entropy(out, y)


def setup():
    torch.manual_seed(0)
    model = Net()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))
    return model, batch


def cosine(a, b) -> float:
    u = torch.cat([t.flatten().double() for t in a])
    v = torch.cat([t.flatten().double() for t in b])
    return float(u @ v / (u.norm() * v.norm()))


def norm(a) -> float:
    return float(torch.cat([t.flatten().double() for t in a]).norm())


def test_bf16_ascent_runs_under_autocast_and_stays_close_to_fp32():
    model, batch = setup()
    params = list(model.parameters())
    loss = RecordingLoss()
    full = ascent_perturbation(model, loss, batch, params, RHO)
    half = ascent_perturbation(model, loss, batch, params, RHO, autocast_dtype=torch.bfloat16)
    assert loss.output_dtypes == [torch.float32, torch.bfloat16]
    assert [t.dtype for t in half] == [torch.float32] * len(params)  # the parameters' dtype
    assert cosine(full, half) > 0.99
    assert norm(half) == pytest.approx(RHO, rel=1e-5)  # the scale is fp32: ||e|| is rho exactly
    assert max((a - b).abs().max().item() for a, b in zip(full, half)) > 0  # bf16 really ran
    assert not torch.is_autocast_enabled("cpu")  # left as it was


def test_the_in_process_worker_uses_the_tasks_ascent_dtype():
    model, batch = setup()
    perturbed = perturbed_indices(model, model.parameters())
    results = {}
    for dtype in (None, torch.bfloat16):
        loss = RecordingLoss()
        task = AscentTask(model, perturbed, loss, ascent_dtype=dtype)
        with InProcessPerturber(task) as worker:
            worker.submit(AscentJob(0, parameters_at(model, perturbed), batch, RHO, seed=0))
            results[dtype] = worker.collect().perturbation
        assert loss.output_dtypes == [torch.float32 if dtype is None else torch.bfloat16]
    assert [t.dtype for t in results[torch.bfloat16]] == [torch.float32] * len(perturbed)
    assert cosine(results[None], results[torch.bfloat16]) > 0.99


@pytest.mark.process
@pytest.mark.timeout(120)
def test_the_cpu_worker_process_runs_its_ascent_in_bf16():
    from asam_tune.perturbers.process_parent import ProcessPerturber

    model, batch = setup()
    perturbed = perturbed_indices(model, model.parameters())
    weights = parameters_at(model, perturbed)

    def in_process(dtype):
        with InProcessPerturber(AscentTask(model, perturbed, RecordingLoss(), ascent_dtype=dtype)) as worker:
            worker.submit(AscentJob(0, weights, batch, RHO, seed=0))
            return worker.collect().perturbation

    task = AscentTask(model, perturbed, RecordingLoss(), ascent_dtype=torch.bfloat16)
    with ProcessPerturber(task, timeout_s=60) as worker:
        worker.submit(AscentJob(0, [w.detach() for w in weights], batch, RHO, seed=0))
        remote = [t.clone() for t in worker.collect().perturbation]
    assert [t.dtype for t in remote] == [torch.float32] * len(perturbed)
    reference, full = in_process(torch.bfloat16), in_process(None)
    # The same bf16 computation as in this process (one thread there: sums may differ in order).
    assert max((a - b).abs().max().item() for a, b in zip(remote, reference)) < 1e-4
    assert cosine(remote, full) > 0.99
    assert max((a - b).abs().max().item() for a, b in zip(remote, full)) > 1e-4  # not the fp32 result


def test_async_sam_takes_an_ascent_dtype_and_refuses_others():
    model, batch = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = RecordingLoss()
    with AsyncSAM(model, opt, compute_loss=loss, ascent_dtype=torch.bfloat16, staleness=0) as sam:
        sam.step(batch)
    # the ascent ran under autocast, the descent (outside the worker) in fp32
    assert loss.output_dtypes == [torch.bfloat16, torch.float32]
    assert check_ascent_dtype("bfloat16") is torch.bfloat16 and check_ascent_dtype(torch.float16) is torch.float16
    for bad in (torch.float32, "int8", 3):
        with pytest.raises(UserInputError, match="Invalid ascent_dtype: .*need None, .parameters., torch.bfloat16"):
            AsyncSAM(model, opt, compute_loss=loss, ascent_dtype=bad)


class Deep(nn.Module):
    """A linear stack whose activation gradients are tiny: fp16 flushes them to zero unscaled."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(16, 16) for _ in range(3)))

    def forward(self, x):
        return self.layers(x)


def tiny_loss(model, batch):
    return 1e-9 * model(batch).float().pow(2).sum()


def test_an_fp16_ascent_is_loss_scaled_so_small_gradients_survive():
    torch.manual_seed(0)
    model = Deep()
    batch = torch.randn(8, 16)
    params = list(model.parameters())
    reference = ascent_perturbation(model, tiny_loss, batch, params, RHO)
    half = ascent_perturbation(model, tiny_loss, batch, params, RHO, autocast_dtype=torch.float16)
    assert abs(norm(half) - RHO) < 1e-4 and cosine(reference, half) > 0.99
    # Unscaled, fp16 loses the gradient of the first layers (this is what the scale is for).
    import asam_tune.perturbers.ascent as ascent

    try:
        ascent.FP16_LOSS_SCALE = 1.0
        unscaled = ascent_perturbation(model, tiny_loss, batch, params, RHO, autocast_dtype=torch.float16)
    finally:
        ascent.FP16_LOSS_SCALE = 2.0 ** 10
    assert unscaled is not None and norm(unscaled) == 0.0  # every gradient flushed to zero


def test_an_fp16_ascent_whose_scaled_backward_overflows_is_redone_unscaled(monkeypatch):
    import asam_tune.perturbers.ascent as ascent

    norms = []
    real = ascent._gradient_and_norm

    def spy(*args, **kwargs):
        grads, n = real(*args, **kwargs)
        norms.append(float(n))
        return grads, n

    monkeypatch.setattr(ascent, "_gradient_and_norm", spy)
    torch.manual_seed(0)
    model = Deep()
    batch = torch.randn(8, 16)
    params = list(model.parameters())

    def big_loss(model, batch):  # fp16 holds 65504: x 1024 overflows in the backward
        return 200.0 * model(batch).float().pow(2).sum()

    reference = ascent_perturbation(model, big_loss, batch, params, RHO)
    half = ascent_perturbation(model, big_loss, batch, params, RHO, autocast_dtype=torch.float16)
    assert half is not None and abs(norm(half) - RHO) < 1e-4 and cosine(reference, half) > 0.99
    assert len(norms) == 3 and not math.isfinite(norms[1]) and math.isfinite(norms[2])  # fp32, scaled, unscaled
