"""``worker_timeout_s`` and ``worker_start_timeout_s`` reach every kind of worker, and its fallback.

A worker built with its own default (60 s) instead would cap every job at 60 s and mark a
slower worker broken for good. Each worker class is replaced by a recorder that keeps the
arguments it was built with and then behaves as the fake worker; the GPU worker is chosen
with fake GPU devices (``torch.device("cuda", N)`` is only a name here).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asam_tune.errors import WorkerError
from asam_tune.perturbers.fake import FakePerturber
from asam_tune.perturbers.in_process import InProcessPerturber
from asam_tune.runtime import AsyncSAM, workers

JOB_S, START_S = 7.5, 9.25


def model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


class Recorder:
    """Stands in for a worker class: records how it was built, then works as the fake worker."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, task, **kwargs):
        self.calls.append(kwargs)
        return FakePerturber(task, timeout_s=kwargs["timeout_s"])


@pytest.fixture
def recorders(monkeypatch):
    from asam_tune.perturbers import process_parent, stream

    found = {"process": Recorder(), "stream": Recorder(), "in_process": Recorder()}
    monkeypatch.setattr(process_parent, "ProcessPerturber", found["process"])
    monkeypatch.setattr(stream, "StreamPerturber", found["stream"])
    monkeypatch.setattr(workers, "InProcessPerturber", found["in_process"])
    return found


def task():
    model, optimizer = model_and_optimizer()
    return workers.ascent_task(model, optimizer, lambda m, b: m(b).sum(), False)


@pytest.mark.parametrize("device, main, kind, expected", [
    (None, "cpu", "in_process", {"timeout_s": JOB_S}),
    ("cpu", "cpu", "process", {"timeout_s": JOB_S, "start_timeout_s": START_S}),
    ("cpu", "cuda:0", "process", {"timeout_s": JOB_S, "start_timeout_s": START_S}),
    ("cuda:0", "cuda:0", "stream", {"timeout_s": JOB_S, "start_timeout_s": START_S, "secondary_stream": True}),
    ("cuda:3", "cuda:2", "stream", {"timeout_s": JOB_S, "start_timeout_s": START_S, "secondary_stream": False}),
])
def test_every_worker_kind_gets_both_limits(recorders, device, main, kind, expected):
    factory = workers.worker_factory(None if device is None else torch.device(device), None, None,
                                     torch.device(main), None, timeout_s=JOB_S, start_timeout_s=START_S)
    worker = factory(task())
    assert worker.timeout_s == JOB_S
    (call,) = recorders[kind].calls
    assert {k: call[k] for k in expected} == expected
    if kind == "stream":
        assert call["device"] == torch.device(device)


def test_async_sam_passes_its_limits_to_a_cpu_worker(recorders):
    model, optimizer = model_and_optimizer()
    with AsyncSAM(model, optimizer, F.cross_entropy, perturbation_device="cpu", worker_timeout_s=JOB_S,
                  worker_start_timeout_s=START_S) as sam:
        (call,) = recorders["process"].calls
        assert call["timeout_s"] == JOB_S and call["start_timeout_s"] == START_S
        assert sam._worker.perturber.timeout_s == JOB_S


def test_the_fallback_worker_keeps_the_job_limit():
    model, optimizer = model_and_optimizer()

    def cannot_start(task):
        raise WorkerError("scripted start failure")

    with pytest.warns(RuntimeWarning, match="scripted start failure"):
        sam = AsyncSAM(model, optimizer, F.cross_entropy, perturber=cannot_start, worker_timeout_s=JOB_S)
    with sam:
        assert isinstance(sam._worker.perturber, InProcessPerturber)
        assert sam._worker.perturber.timeout_s == JOB_S

    model, optimizer = model_and_optimizer()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with AsyncSAM(model, optimizer, F.cross_entropy, worker_timeout_s=JOB_S,
                  perturber=lambda task: FakePerturber(task, timeout_s=JOB_S, script={1: "die"})) as sam:
        sam.step(x, y)
        with pytest.warns(RuntimeWarning, match="killed"):
            for _ in range(3):
                sam.step(x, y)
        assert isinstance(sam._worker.perturber, InProcessPerturber)
        assert sam._worker.perturber.timeout_s == JOB_S
