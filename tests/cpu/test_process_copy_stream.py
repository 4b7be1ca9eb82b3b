"""The CPU worker fed from GPU weights: the handover on a copy stream, checked on the CPU.

``RecordingLayer`` treats the CPU as the GPU, so ``ProcessPerturber`` takes its GPU path with
CPU tensors: gather on the copy stream, the main stream waiting for the gather only, the copy
into the shared buffers, the job sent by the sender thread once copied, the result copied up
on the copy stream. The vector clocks say what the GPU would order; the host waits say who
waited.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asam_tune import AsyncSAM
from asam_tune.perturbers.ascent import parameters_at, perturbed_indices
from asam_tune.perturbers.base import AscentJob, AscentTask
from asam_tune.perturbers.batches import OutputTargetLoss
from asam_tune.perturbers.device_layer import HostThreadLayer, RecordingLayer
from asam_tune.perturbers.in_process import InProcessPerturber
from asam_tune.perturbers.process_parent import ProcessPerturber

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]
RHO = 0.05


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).double()


def batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
            for _ in range(n)]


def test_the_handover_runs_on_the_copy_stream_and_only_the_sender_waits_for_the_host():
    model = make_model()
    task = AscentTask(model, perturbed_indices(model, model.parameters()), OutputTargetLoss(F.cross_entropy))
    weights = parameters_at(model, task.perturbed)
    layer = RecordingLayer()
    with ProcessPerturber(task, timeout_s=60, layer=layer) as worker, InProcessPerturber(task) as reference:
        for step, batch in enumerate(batches(3)):
            worker.submit(AscentJob(step, weights, batch, RHO, seed=step))
            submitted = len(layer.ops)
            apply = layer.mark("apply", layer.main)  # what AsyncSAM does next on the main stream
            got = worker.collect(60).perturbation
            result_copies = [op for op in layer.ops[submitted + 1:] if op.label == "copy"]
            use = layer.mark("use result", layer.main)
            reference.submit(AscentJob(step, weights, batch, RHO, seed=step))
            expected = reference.collect().perturbation
            assert max((a - b).abs().max().item() for a, b in zip(got, expected)) < 1e-9

            ops = layer.ops[:submitted]
            gathers = [op for op in ops if op.label == "gather"]
            copies = [op for op in ops if op.label == "copy" and op.stamp[op.stream] > gathers[-1].stamp[op.stream]]
            assert gathers and copies and all(op.stream != "main" for op in gathers + copies)
            # The main stream waits for the gather (device to device) before it perturbs w_t ...
            assert layer.ordered_before(gathers[-1], apply)
            # ... not for the copies to the host, nor for the batch.
            assert not any(layer.ordered_before(c, apply) for c in copies)
            # The result's copy up comes before the main stream uses it.
            assert result_copies and all(op.stream != "main" for op in result_copies)
            assert all(layer.ordered_before(c, use) for c in result_copies)
        # Every shared buffer was page-locked whole, none in part (CUDA refuses that).
        assert not worker._handle.pin_warned and len(layer.cudart().ranges) >= 3
    waiting_threads = {thread for thread, _ in layer.host_waits}
    assert waiting_threads == {"asam-handover-sender"}, layer.host_waits


def test_async_sam_with_the_copy_stream_path_trains_like_the_cpu_path():
    """Same perturbations through the copy-stream path (host threads as streams) as through the plain one."""
    results = {}
    for name, layer in (("plain", None), ("threads", HostThreadLayer())):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with AsyncSAM(model, opt, F.cross_entropy, rho=RHO, seed=0,
                      perturber=lambda task: ProcessPerturber(task, timeout_s=60, layer=layer)) as sam:
            for batch in sam.lookahead(batches(4)):
                sam.step(batch)
            assert sam.stats().fallbacks == 0
        results[name] = [p.detach().clone() for p in model.parameters()]
        if layer is not None:
            layer.close()
    assert max((a - b).abs().max().item() for a, b in zip(results["plain"], results["threads"])) < 1e-9


def test_the_profilers_handover_from_accelerator_weights_takes_the_copy_stream_path():
    """The handover point for a GPU main is timed on the runtime's own copy-stream path."""
    from asam_tune.profiler.handover import measure_handover
    from asam_tune.timing import MeasureSettings, PerfClock
    from asam_tune.workloads import load_workload

    layer = RecordingLayer()
    settings = MeasureSettings(warmup=1, min_time_s=0.01, min_repeats=3, max_repeats=5, noise_threshold=0.1)
    stats = measure_handover(load_workload("mnist1d-cnn"), 1, None, settings=settings, clock=PerfClock(),
                             layer=layer)
    assert len(stats.samples_s) >= 3 and stats.median_s > 0
    labels = [op.label for op in layer.ops]
    handovers = 1 + len(stats.samples_s)  # the warm-up and the timed ones
    assert labels.count("gather") >= handovers  # one gather per dtype per job
    assert {thread for thread, _ in layer.host_waits} == {"asam-handover-sender"}
