"""The CUDA perturbation workers: StreamPerturber, and ProcessPerturber fed from GPU weights.

They compare against InProcessPerturber and skip without CUDA (tests/conftest.py). The parts
testable without a GPU (the job thread, the argument checks) are in tests/cpu/test_process_worker.py.
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asam_tune.errors import UserInputError, WorkerError
from asam_tune.perturbers.ascent import parameters_at, perturbed_indices
from asam_tune.perturbers.base import AscentJob, AscentTask
from asam_tune.perturbers.batches import OutputTargetLoss
from asam_tune.perturbers.in_process import InProcessPerturber
from asam_tune.perturbers.stream import StreamPerturber

RHO = 0.05
SLEEP, HANG, RAISE, NAN = 1000.0, 2000.0, 3000.0, 4000.0
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)


def scripted_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MSE, unless ``y[0, 0]`` tells the worker to be slow, hang, raise or go non-finite."""
    command = float(y[0, 0])
    if command == SLEEP:
        time.sleep(0.5)
    elif command == HANG:
        time.sleep(5)
    elif command == RAISE:
        raise ValueError("scripted failure 3000")
    elif command == NAN:
        return out.sum() * float("nan")
    return F.mse_loss(out, y)


def make_model(device: str) -> nn.Module:
    torch.manual_seed(0)
    return BNNet().double().to(device)  # train mode: BatchNorm on batch statistics; the replica follows


def task_of(model: nn.Module) -> AscentTask:
    return AscentTask(model, perturbed_indices(model, model.parameters()), OutputTargetLoss(scripted_loss))


def job(step: int, weights, data, *, rho: float = RHO) -> AscentJob:
    return AscentJob(step=step, weights=weights, batch=data, rho=rho, seed=step)


def batch(rows: int, device: str, *, command: float | None = None):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 5, dtype=torch.float64, generator=g)
    y = torch.randn(rows, 3, dtype=torch.float64, generator=g)
    if command is not None:
        y[0, 0] = command
    return x.to(device), y.to(device)


def moved_weights(model: nn.Module, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [p.detach() + 0.1 * torch.randn(p.shape, dtype=p.dtype, generator=g).to(p.device)
            for p in parameters_at(model, perturbed_indices(model, model.parameters()))]


def max_diff(a, b) -> float:
    assert len(a) == len(b)
    return max((u.double().cpu() - v.double().cpu()).abs().max().item() for u, v in zip(a, b))


# -- on a GPU


@pytest.fixture
def stream_worker():
    model = make_model("cuda:0")
    p = StreamPerturber(task_of(model), device="cuda:0", secondary_stream=True, timeout_s=30)
    yield model, p
    p.close()


@pytest.mark.gpu
def test_secondary_stream_matches_in_process_perturber(stream_worker):
    model, worker = stream_worker
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = InProcessPerturber(worker.task)
    for step, (rows, where) in enumerate(((16, "cuda:0"), (8, "cpu"), (24, "cuda:0"))):
        weights = moved_weights(model, step)
        x, y = batch(rows, where)
        worker.submit(job(step, weights, (x, y)))
        got = worker.collect(timeout=30)
        reference.submit(job(step, weights, (x.to("cuda:0"), y.to("cuda:0"))))
        want = reference.collect(0)
        assert got.step == step
        assert all(t.device == torch.device("cuda:0") and t.dtype == torch.float64 for t in got.perturbation)
        assert max_diff(got.perturbation, want.perturbation) <= 1e-10
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.gpu
def test_the_stream_replica_follows_the_main_models_modes_and_buffers(stream_worker):
    """A job in train mode moves the replica's BatchNorm statistics, a forward of the main model
    moves the main model's; with the BatchNorm then in eval mode the worker must read the main
    model's statistics, as the in-process reference does on the main model itself."""
    model, worker = stream_worker
    reference = InProcessPerturber(worker.task)
    weights, data = moved_weights(model, 10), batch(8, "cuda:0")
    worker.submit(job(10, weights, data))
    worker.collect(timeout=30)
    with torch.no_grad():
        model(batch(16, "cuda:0")[0] * 3.0 + 1.0)
    model.net[1].eval()
    for step in (11, 12):
        worker.submit(job(step, weights, data))
        got = [t.clone() for t in worker.collect(timeout=30).perturbation]
        reference.submit(job(step, weights, data))
        assert max_diff(got, reference.collect().perturbation) <= 1e-10
    model.train()
    worker.submit(job(13, weights, data))
    got = [t.clone() for t in worker.collect(timeout=30).perturbation]
    reference.submit(job(13, weights, data))
    assert max_diff(got, reference.collect().perturbation) <= 1e-10


@pytest.mark.gpu
def test_stream_job_runs_concurrently_and_reports_errors(stream_worker):
    model, worker = stream_worker
    worker.submit(job(1, moved_weights(model, 1), batch(8, "cuda:0", command=SLEEP)))
    assert not worker.ready()
    end = time.monotonic() + 30
    while not worker.ready() and time.monotonic() < end:
        time.sleep(0.01)
    assert worker.collect(timeout=0).perturbation is not None

    worker.submit(job(2, moved_weights(model, 2), batch(8, "cuda:0", command=RAISE)))
    with pytest.raises(WorkerError, match="ValueError: scripted failure 3000") as info:
        worker.collect(timeout=30)
    assert "scripted_loss" in info.value.remote_traceback

    worker.submit(job(3, moved_weights(model, 3), batch(8, "cuda:0", command=NAN)))
    assert worker.collect(timeout=30).perturbation is None
    worker.submit(job(4, moved_weights(model, 4), batch(8, "cuda:0")))
    assert worker.collect(timeout=30).perturbation is not None


@pytest.mark.gpu
def test_hung_stream_job_times_out():
    model = make_model("cuda:0")
    worker = StreamPerturber(task_of(model), device="cuda:0", secondary_stream=True, timeout_s=0.5)
    worker.submit(job(0, moved_weights(model, 0), batch(8, "cuda:0", command=HANG)))
    with pytest.raises(WorkerError, match="hung"):
        worker.collect(timeout=30)
    with pytest.raises(WorkerError, match="no longer usable"):
        worker.submit(job(1, moved_weights(model, 1), batch(8, "cuda:0")))
    worker.close()


@pytest.mark.gpu
def test_secondary_stream_flag_must_match_the_device():
    model = make_model("cuda:0")
    with pytest.raises(UserInputError, match="secondary_stream=True"):
        StreamPerturber(task_of(model), device="cuda:0", secondary_stream=False)


@pytest.mark.gpu
@needs_two_gpus
def test_other_gpu_matches_in_process_perturber():
    model = make_model("cuda:0")
    with pytest.raises(UserInputError, match="model's own"):
        StreamPerturber(task_of(model), device="cuda:1", secondary_stream=True)
    worker = StreamPerturber(task_of(model), device="cuda:1", secondary_stream=False)
    reference = InProcessPerturber(task_of(model))
    try:
        for step, rows in enumerate((16, 8)):
            weights = moved_weights(model, step)
            data = batch(rows, "cuda:0")
            worker.submit(job(step, weights, data))
            got = worker.collect(timeout=30)
            reference.submit(job(step, weights, data))
            assert all(t.device == torch.device("cuda:0") for t in got.perturbation)
            assert max_diff(got.perturbation, reference.collect(0).perturbation) <= 1e-10
    finally:
        worker.close()


@pytest.mark.gpu
@pytest.mark.process
@pytest.mark.timeout(90)
def test_cpu_worker_process_fed_from_gpu_weights():
    """GPU weights go through page-locked shared memory and the result comes back on the GPU."""
    from asam_tune.perturbers.process_parent import ProcessPerturber

    model = make_model("cuda:0")
    cpu_model = make_model("cpu")
    reference = InProcessPerturber(task_of(cpu_model))
    with ProcessPerturber(task_of(model)) as worker:
        previous = None
        for step, rows in enumerate((16, 24, 32)):
            weights = moved_weights(model, step)
            x, y = batch(rows, "cuda:0")
            worker.submit(job(step, weights, (x, y)))
            if previous is not None:
                # The last result is applied during the main step, while this job runs: the
                # worker must not have rewritten the shared buffer under its copy to the GPU.
                assert max_diff(*previous) <= 1e-12
            got = worker.collect(timeout=60)
            reference.submit(job(step, [w.cpu() for w in weights], (x.cpu(), y.cpu())))
            expected = reference.collect(0).perturbation
            assert all(t.device == torch.device("cuda:0") for t in got.perturbation)
            assert max_diff(got.perturbation, expected) <= 1e-12
            previous = (got.perturbation, [e.clone() for e in expected])
