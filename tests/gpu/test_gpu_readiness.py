"""The GPU paths for real (skipped without CUDA): the copy-stream handover of the CPU worker,
the snapshot stream worker's memory, bf16 ascent on a stream, NVTX ranges."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asam_tune import AsyncSAM
from asam_tune.costmodel.memory import SAME_GPU_WORKER_PARAMETER_COPIES
from asam_tune.perturbers.ascent import parameters_at, perturbed_indices
from asam_tune.perturbers.base import AscentJob, AscentTask
from asam_tune.perturbers.batches import OutputTargetLoss
from asam_tune.perturbers.in_process import InProcessPerturber

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180)]
RHO = 0.05


def make(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10)).to("cuda", dtype)
    task = AscentTask(model, perturbed_indices(model, model.parameters()), OutputTargetLoss(F.cross_entropy))
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(32, 64, generator=g).to("cuda", dtype), torch.randint(0, 10, (32,), generator=g).cuda())
    return model, task, batch


def reference(task, batch, dtype=None):
    task = AscentTask(task.model, task.perturbed, task.compute_loss, ascent_dtype=dtype)
    with InProcessPerturber(task) as worker:
        worker.submit(AscentJob(0, parameters_at(task.model, task.perturbed), batch, RHO, seed=0))
        return [t.clone() for t in worker.collect().perturbation]


def cosine(a, b) -> float:
    u, v = torch.cat([t.flatten().double() for t in a]), torch.cat([t.flatten().double() for t in b])
    return float(u @ v / (u.norm() * v.norm()))


@pytest.mark.process
def test_the_cpu_worker_fed_from_the_gpu_matches_the_in_process_ascent():
    from asam_tune.perturbers.process_parent import ProcessPerturber

    model, task, batch = make()
    expected = reference(task, batch)
    with ProcessPerturber(task, timeout_s=60) as worker:
        for step in range(3):
            worker.submit(AscentJob(step, parameters_at(model, task.perturbed), batch, RHO, seed=0))
            got = worker.collect(60).perturbation
            torch.cuda.synchronize()
            assert max((a - b).abs().max().item() for a, b in zip(got, expected)) < 1e-4
        assert worker._handle.registered  # the shared buffers were page-locked


def test_the_same_gpu_stream_worker_holds_about_the_figures_of_the_cost_model():
    from asam_tune.perturbers.stream import StreamPerturber

    model, task, batch = make()
    weight_bytes = sum(p.numel() * p.element_size() for p in parameters_at(model, task.perturbed))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with StreamPerturber(task, device="cuda", secondary_stream=True) as worker:
        worker.submit(AscentJob(0, parameters_at(model, task.perturbed), batch, RHO, seed=0))
        result = worker.collect(60).perturbation
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        assert held <= 2 * weight_bytes + (1 << 20)  # snapshot + perturbation (+ buffers, the batch)
        assert torch.cuda.max_memory_allocated() - before <= SAME_GPU_WORKER_PARAMETER_COPIES * weight_bytes + (8 << 20)
        assert cosine(result, reference(task, batch)) > 0.9999


def test_bf16_ascent_on_the_stream_is_close_to_fp32_and_keeps_the_parameters_dtype():
    from asam_tune.perturbers.stream import StreamPerturber

    model, task, batch = make()
    task16 = AscentTask(task.model, task.perturbed, task.compute_loss, ascent_dtype=torch.bfloat16)
    with StreamPerturber(task16, device="cuda", secondary_stream=True) as worker:
        worker.submit(AscentJob(0, parameters_at(model, task.perturbed), batch, RHO, seed=0))
        got = worker.collect(60).perturbation
    assert all(t.dtype == torch.float32 for t in got)
    assert cosine(got, reference(task, batch)) > 0.99


def test_async_sam_on_a_second_stream_with_nvtx_ranges_trains():
    model, task, batch = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with AsyncSAM(model, opt, F.cross_entropy, perturbation_device="cuda", nvtx=True,
                  ascent_dtype=torch.bfloat16) as sam:
        for b in sam.lookahead([batch] * 5):
            sam.step(b)
        assert sam.stats().fallbacks == 0
    torch.cuda.synchronize()
