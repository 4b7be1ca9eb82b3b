"""The stream worker's extra memory, counted on the CPU, against the cost model's figures; a
fallback that allocates nothing large."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from asam_tune import AsyncSAM
from asam_tune.costmodel.memory import SAME_GPU_WORKER_PARAMETER_COPIES
from asam_tune.perturbers.ascent import parameters_at, perturbed_indices
from asam_tune.perturbers.base import AscentJob, AscentTask
from asam_tune.perturbers.batches import OutputTargetLoss
from asam_tune.perturbers.device_layer import RecordingLayer
from asam_tune.perturbers.fake import FakePerturber
from asam_tune.perturbers.stream import StreamPerturber
from asam_tune.runtime.failures import SupervisedWorker

pytestmark = pytest.mark.timeout(60)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 4))
    model[0].requires_grad_(False)  # a frozen stem: the snapshot replica shares it
    return model


def storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def test_the_same_gpu_stream_worker_holds_two_weight_copies_between_jobs():
    model = make_model()
    task = AscentTask(model, perturbed_indices(model, [p for p in model.parameters() if p.requires_grad]),
                      OutputTargetLoss(F.cross_entropy))
    weights = parameters_at(model, task.perturbed)
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    model_storages = storages([*model.parameters(), *model.buffers()])
    batch = (torch.randn(8, 32), torch.randint(0, 4, (8,)))
    with StreamPerturber(task, device="cpu", secondary_stream=True, layer=RecordingLayer()) as worker:
        worker.submit(AscentJob(0, weights, batch, 0.05, seed=0))
        result = worker.collect(30).perturbation
        replica = worker._replica
        own = {k: v for k, v in storages([*replica.parameters(), *replica.buffers(), *result]).items()
               if k not in model_storages}
        buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
        # The snapshot of the perturbed weights and the perturbation; the frozen stem is the
        # model's own; the buffers are cloned. The gradients (the third copy) live only in a job.
        assert sum(own.values()) == 2 * weight_bytes + buffer_bytes
        assert SAME_GPU_WORKER_PARAMETER_COPIES == 3
        shared = [p for p in replica.parameters() if p.untyped_storage().data_ptr() in model_storages]
        assert [p.shape for p in shared] == [p.shape for p in model[0].parameters()]


class Allocations(TorchDispatchMode):
    """Every tensor an operation returns, by size."""

    def __init__(self):
        super().__init__()
        self.numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numels.append(t.numel())
        return out


def test_the_fallback_allocates_nothing_large_when_the_worker_fails(monkeypatch):
    model = make_model()
    largest = max(p.numel() for p in model.parameters())
    seen: list[list[int]] = []
    replace = SupervisedWorker._replace

    def watched(self):
        with Allocations() as allocations:
            replace(self)
        seen.append(allocations.numels)

    monkeypatch.setattr(SupervisedWorker, "_replace", watched)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(8, 32), torch.randint(0, 4, (8,))) for _ in range(3)]
    with pytest.warns(RuntimeWarning, match="continuing with synchronous SAM"):
        with AsyncSAM(model, opt, F.cross_entropy, perturber=lambda task: FakePerturber(task, script={1: "die"})) as sam:
            for batch in sam.lookahead(batches):
                sam.step(batch)
            assert sam.stats().fallbacks == 1
    assert len(seen) == 1
    assert all(n < largest for n in seen[0]), seen[0]  # no weight-sized tensor: no replica, no copy
