"""The contract every perturber keeps, run against each one: in-process, fake, CPU process, CUDA stream.

In the style of Optuna's shared sampler tests: one suite, parametrized over the
implementations. The reference is SAM's ascent written out here (float64, by hand), on a copy
of the main model as it is at the job: its frozen weights, buffers, module modes and the job's
seed for dropout. Each worker must equal it within 1e-9, follow state changed after it
started, take any batch structure, say "not finite" with None, keep one job at a time and
report a job's exception without dying.

The CPU worker unpickles the models and losses below, so they live at module level.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asam_tune.errors import UserInputError, WorkerError
from asam_tune.perturbers.ascent import parameters_at, perturbed_indices, seeded
from asam_tune.perturbers.base import AscentJob, AscentTask
from asam_tune.perturbers.batches import unflatten  # noqa: F401 - the dict batches below go through it

pytestmark = pytest.mark.timeout(120)

RHO = 0.07
TOLERANCE = 1e-9

IMPLEMENTATIONS = [
    pytest.param("in_process", id="in_process"),
    pytest.param("fake", id="fake"),
    pytest.param("process", marks=pytest.mark.process, id="process"),
    pytest.param("stream", marks=pytest.mark.gpu, id="stream"),
    # The stream worker's own code on the CPU, its CUDA calls through a recording fake layer.
    pytest.param("stream_fake", id="stream_fake"),
]
STREAMS = ("stream", "stream_fake")


# ----------------------------------------------------------------------------- models and losses


class Net(nn.Module):
    """A frozen-able stem, BatchNorm, dropout: everything a replica can get wrong."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(5, 8)
        self.norm = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.drop(self.norm(self.stem(x)))))


def xy_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def dict_loss(model, batch):
    """A nested dict batch with a non-tensor leaf that steers the loss."""
    loss = F.cross_entropy(model(batch["inputs"]["x"] * batch["inputs"]["scale"]), batch["labels"])
    if batch["mode"] == "nan":
        return loss * float("inf")
    if batch["mode"] == "raise":
        raise ValueError("scripted failure in compute_loss")
    return loss


def device_of(kind: str) -> torch.device:
    return torch.device("cuda", 0) if kind == "stream" else torch.device("cpu")


def make_model(kind: str, frozen_stem: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = Net().double().to(device_of(kind))
    if kind in STREAMS:
        # The stream worker's dropout draws from a generator of its own (seeded_dropout.py):
        # other masks than torch's kernel, so no dropout where it is compared with the reference.
        model.drop.p = 0.0
    if frozen_stem:
        model.stem.requires_grad_(False)
    return model


def xy_batch(kind: str, rows: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (rows,), generator=g)
    return x.to(device_of(kind)), y.to(device_of(kind))


def dict_batch(kind: str, mode: str = "ok"):
    x, y = xy_batch(kind)
    return {"inputs": {"x": x, "scale": 0.5}, "labels": y, "mode": mode}


def make_perturber(kind: str, task: AscentTask):
    if kind == "in_process":
        from asam_tune.perturbers.in_process import InProcessPerturber

        return InProcessPerturber(task)
    if kind == "fake":
        from asam_tune.perturbers.fake import FakePerturber

        return FakePerturber(task)
    if kind == "process":
        from asam_tune.perturbers.process_parent import ProcessPerturber

        return ProcessPerturber(task, timeout_s=60)
    from asam_tune.perturbers.stream import StreamPerturber

    if kind == "stream_fake":
        from asam_tune.perturbers.device_layer import RecordingLayer

        return StreamPerturber(task, device="cpu", secondary_stream=True, timeout_s=60, layer=RecordingLayer())
    return StreamPerturber(task, device="cuda:0", secondary_stream=True, timeout_s=60)


def task_for(model: nn.Module, compute_loss=xy_loss, adaptive: bool = False) -> AscentTask:
    optimizer_params = [p for p in model.parameters() if p.requires_grad]
    return AscentTask(model, perturbed_indices(model, optimizer_params), compute_loss, adaptive)


# ----------------------------------------------------------------------------- the reference


def reference(model: nn.Module, task: AscentTask, weights, batch, rho: float, seed: int):
    """SAM's ascent, written out: a copy of the model as it is now, the job's weights and seed."""
    replica = copy.deepcopy(model)
    params = parameters_at(replica, task.perturbed)
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
    with seeded(seed, device_of("stream") if batch_device(batch).type == "cuda" else None):
        loss = task.compute_loss(replica, batch)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    if task.adaptive:
        norm = torch.sqrt(sum(((p.abs() * g) ** 2).sum() for p, g in zip(params, grads)))
        return [(rho * p.detach() ** 2 * g / norm).cpu() for p, g in zip(params, grads)]
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    return [(rho * g / norm).cpu() for g in grads]


def batch_device(batch) -> torch.device:
    while not isinstance(batch, torch.Tensor):
        batch = batch[0] if isinstance(batch, (tuple, list)) else batch["labels"]
    return batch.device


def run_job(perturber, model, task, batch, *, seed: int = 3, weights=None, step: int = 0):
    weights = [p.detach() for p in parameters_at(model, task.perturbed)] if weights is None else weights
    perturber.submit(AscentJob(step, weights, batch, RHO, seed))
    return perturber.collect(60)


def max_diff(got, expected) -> float:
    assert len(got) == len(expected)
    return max((g.cpu() - e).abs().max().item() for g, e in zip(got, expected))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed"


# ----------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("kind", IMPLEMENTATIONS)
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "adaptive"])
def test_equals_the_written_out_ascent_and_leaves_the_main_model_as_it_was(kind, adaptive):
    model = make_model(kind)
    task = task_for(model, adaptive=adaptive)
    batch = xy_batch(kind)
    with make_perturber(kind, task) as perturber:
        before = snapshot(model)
        expected = reference(model, task, parameters_at(model, task.perturbed), batch, RHO, seed=3)
        result = run_job(perturber, model, task, batch, seed=3)
        assert result.step == 0 and result.perturbation is not None
        assert max_diff(result.perturbation, expected) < TOLERANCE
        assert_unchanged(model, before)  # BatchNorm's statistics move in the descent only

        # Other weights than the model's (the snapshot a staleness-1 job carries).
        other = [p.detach() + 0.01 for p in parameters_at(model, task.perturbed)]
        expected = reference(model, task, other, batch, RHO, seed=4)
        result = run_job(perturber, model, task, batch, seed=4, weights=other, step=1)
        assert max_diff(result.perturbation, expected) < TOLERANCE
        assert_unchanged(model, before)


@pytest.mark.parametrize("kind", IMPLEMENTATIONS)
def test_follows_state_changed_after_it_started(kind):
    """Frozen weights loaded later, eval-mode BatchNorm, dropout off, and the replica's own BN writes."""
    model = make_model(kind, frozen_stem=True)
    task = task_for(model)
    batch = xy_batch(kind)
    with make_perturber(kind, task) as perturber:
        # A first job in train mode: a replica's BatchNorm writes its own running statistics.
        run_job(perturber, model, task, batch)
        # Pretrained weights loaded after the worker started, then the usual fine-tuning recipe.
        torch.manual_seed(5)
        donor = Net().double()
        with torch.no_grad():
            donor.norm.running_mean.uniform_(-1, 1)
            donor.norm.running_var.uniform_(0.5, 2)
        model.load_state_dict(donor.state_dict())
        model.norm.eval()
        model.drop.eval()
        expected = reference(model, task, parameters_at(model, task.perturbed), batch, RHO, seed=6)
        result = run_job(perturber, model, task, batch, seed=6, step=1)
        assert max_diff(result.perturbation, expected) < TOLERANCE

        # Back to train mode, and the statistics changed in place by the main model's own step.
        model.train()
        with torch.no_grad():
            model(batch[0])
        expected = reference(model, task, parameters_at(model, task.perturbed), batch, RHO, seed=7)
        result = run_job(perturber, model, task, batch, seed=7, step=2)
        assert max_diff(result.perturbation, expected) < TOLERANCE


@pytest.mark.parametrize("kind", IMPLEMENTATIONS)
def test_takes_nested_dict_batches_with_non_tensor_leaves(kind):
    model = make_model(kind)
    task = task_for(model, dict_loss)
    batch = dict_batch(kind)
    with make_perturber(kind, task) as perturber:
        expected = reference(model, task, parameters_at(model, task.perturbed), batch, RHO, seed=3)
        result = run_job(perturber, model, task, batch)
        assert max_diff(result.perturbation, expected) < TOLERANCE
        # A smaller batch of the same structure (b_p shrank) reuses the shared buffers.
        small = {**batch, "inputs": {"x": batch["inputs"]["x"][:2], "scale": 0.5}, "labels": batch["labels"][:2]}
        expected = reference(model, task, parameters_at(model, task.perturbed), small, RHO, seed=3)
        result = run_job(perturber, model, task, small, step=1)
        assert max_diff(result.perturbation, expected) < TOLERANCE


@pytest.mark.parametrize("kind", IMPLEMENTATIONS)
def test_the_seed_decides_dropout(kind):
    model = make_model(kind)
    model.drop.p = 0.3  # the streams' models come without it (see make_model)
    task = task_for(model)
    batch = xy_batch(kind)
    with make_perturber(kind, task) as perturber:
        first = [t.clone() for t in run_job(perturber, model, task, batch, seed=11).perturbation]
        again = run_job(perturber, model, task, batch, seed=11, step=1).perturbation
        assert max_diff(again, [t.cpu() for t in first]) == 0.0
        other = run_job(perturber, model, task, batch, seed=12, step=2).perturbation
        assert max_diff(other, [t.cpu() for t in first]) > 1e-6  # another dropout mask


@pytest.mark.parametrize("kind", [p for p in IMPLEMENTATIONS if p.values[0] in STREAMS])
def test_a_stream_job_leaves_the_main_threads_generators_alone(kind):
    """Its dropout draws from the worker's own generator: the main step's masks do not depend on
    when the worker ran."""
    model = make_model(kind)
    model.drop.p = 0.3
    task = task_for(model)
    batch = xy_batch(kind)
    with make_perturber(kind, task) as perturber:
        cpu_state = torch.get_rng_state()
        cuda_state = torch.cuda.get_rng_state(device_of(kind)) if device_of(kind).type == "cuda" else None
        run_job(perturber, model, task, batch, seed=11)
        assert torch.equal(torch.get_rng_state(), cpu_state)
        if cuda_state is not None:
            assert torch.equal(torch.cuda.get_rng_state(device_of(kind)), cuda_state)


@pytest.mark.parametrize("kind", IMPLEMENTATIONS)
def test_a_gradient_that_is_not_finite_gives_no_perturbation(kind):
    model = make_model(kind)
    task = task_for(model, dict_loss)
    with make_perturber(kind, task) as perturber:
        assert run_job(perturber, model, task, dict_batch(kind, "nan")).perturbation is None
        assert run_job(perturber, model, task, dict_batch(kind), step=1).perturbation is not None


@pytest.mark.parametrize("kind", IMPLEMENTATIONS)
def test_a_job_that_raises_is_reported_and_the_worker_goes_on(kind):
    model = make_model(kind)
    task = task_for(model, dict_loss)
    with make_perturber(kind, task) as perturber:
        weights = [p.detach() for p in parameters_at(model, task.perturbed)]
        if kind == "in_process":
            # The caller's own thread: the caller's exception, as it is.
            with pytest.raises(ValueError, match="scripted failure"):
                perturber.submit(AscentJob(0, weights, dict_batch(kind, "raise"), RHO, 0))
        else:
            perturber.submit(AscentJob(0, weights, dict_batch(kind, "raise"), RHO, 0))
            with pytest.raises(WorkerError, match="scripted failure") as raised:
                perturber.collect(60)
            assert "ValueError" in (raised.value.remote_traceback or "")
        assert run_job(perturber, model, task, dict_batch(kind), step=1).perturbation is not None


@pytest.mark.parametrize("kind", IMPLEMENTATIONS)
def test_one_job_at_a_time_and_nothing_after_close(kind):
    model = make_model(kind)
    task = task_for(model)
    batch = xy_batch(kind)
    perturber = make_perturber(kind, task)
    weights = [p.detach() for p in parameters_at(model, task.perturbed)]
    assert not perturber.ready()
    with pytest.raises(RuntimeError, match="without a submitted job"):
        perturber.collect(1)
    with pytest.raises(UserInputError, match="perturbed parameters"):
        perturber.submit(AscentJob(0, weights[:-1], batch, RHO, 0))
    perturber.submit(AscentJob(0, weights, batch, RHO, 0))
    with pytest.raises(RuntimeError, match="pending"):
        perturber.submit(AscentJob(1, weights, batch, RHO, 0))
    assert perturber.collect(60).step == 0
    perturber.close()
    perturber.close()  # idempotent
    with pytest.raises((RuntimeError, WorkerError)):
        perturber.submit(AscentJob(2, weights, batch, RHO, 0))


# ----------------------------------------------------------------------------- SyncBatchNorm


class SyncNet(Net):
    """Net with its BatchNorm made a SyncBatchNorm, as ``convert_sync_batchnorm`` does under DDP."""

    def __init__(self):
        super().__init__()
        self.norm = nn.SyncBatchNorm.convert_sync_batchnorm(self.norm)


class CountingSyncFunction:
    """Stands in for SyncBatchNorm's collective: counts the calls and refuses to run."""

    calls = 0

    @classmethod
    def apply(cls, *args):
        cls.calls += 1
        raise RuntimeError("SyncBatchNorm's collective ran during the ascent")


@pytest.fixture
def process_group(tmp_path, monkeypatch):
    """An initialised gloo group (one rank), as under torchrun: SyncBatchNorm would synchronise."""
    import torch.distributed as dist
    import torch.nn.modules.batchnorm as batchnorm

    CountingSyncFunction.calls = 0
    monkeypatch.setattr(batchnorm, "sync_batch_norm", CountingSyncFunction)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", IMPLEMENTATIONS)
def test_sync_batch_norm_runs_rank_local_with_no_collective(kind, process_group):
    torch.manual_seed(0)
    model = SyncNet().double().to(device_of(kind))
    twin = Net().double().to(device_of(kind))  # the same function with a plain BatchNorm
    twin.load_state_dict(model.state_dict())
    if kind in STREAMS:  # no per-job seed there (see make_model)
        model.drop.p = twin.drop.p = 0.0
    task = task_for(model)
    batch = xy_batch(kind)
    with make_perturber(kind, task) as perturber:
        before = snapshot(model)
        expected = reference(twin, task_for(twin), parameters_at(twin, task.perturbed), batch, RHO, seed=3)
        result = run_job(perturber, model, task, batch, seed=3)
        assert max_diff(result.perturbation, expected) < TOLERANCE
        assert_unchanged(model, before)
    assert CountingSyncFunction.calls == 0
    # The main model keeps its SyncBatchNorm: its own step still synchronises.
    assert type(model.norm) is nn.SyncBatchNorm and "forward" not in model.norm.__dict__
