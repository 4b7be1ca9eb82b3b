"""The CPU perturbation worker process against the in-process reference, and its failure modes.

Also the CPU-testable part of the CUDA worker (its job thread, its argument checks): the
tests/gpu tier is skipped as a whole on machines without CUDA.

The worker imports this module to unpickle the model and loss classes below, so they live at
module level. One worker is shared by the tests that leave it usable; the tests that kill,
hang or break a worker start their own.
"""
from __future__ import annotations

import gc
import math
import multiprocessing
import multiprocessing.resource_tracker
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asam_tune.errors import UserInputError, WorkerError
from asam_tune.perturbers.ascent import parameters_at, perturbed_indices
from asam_tune.perturbers.base import AscentJob, AscentTask
from asam_tune.perturbers.batches import OutputTargetLoss
from asam_tune.perturbers.in_process import InProcessPerturber
from asam_tune.perturbers.process_parent import ProcessPerturber
from asam_tune.perturbers.state_sync import module_modes
from asam_tune.perturbers.stream import JobThread, StreamPerturber

pytestmark = pytest.mark.timeout(90)
process = pytest.mark.process  # on every test that starts (or checks the start of) a worker process

RHO = 0.05
PARENT_DEATH_DEADLINE_S = 2.0  # the spec: an orphaned worker is gone within 2 s
# Commands the scripted loss reads from y[0, 0]; random targets never hit them.
SLEEP, HANG, RAISE, NAN = 1000.0, 2000.0, 3000.0, 4000.0


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        # Dropout: the ascent's random draws come from the job's seed, in the worker as here.
        self.net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.25), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return BNNet().double()


def scripted_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MSE, unless ``y[0, 0]`` tells the worker to be slow, hang, raise or go non-finite."""
    command = float(y[0, 0])
    if command == SLEEP:
        time.sleep(0.5)
    elif command == HANG:
        time.sleep(3600)
    elif command == RAISE:
        raise ValueError("scripted failure 3000")
    elif command == NAN:
        return out.sum() * float("nan")
    return F.mse_loss(out, y)


class RefusesToRebuildInWorker(BNNet):
    """Pickles fine; unpickling fails, or kills the process, only inside the worker."""

    exit_code: int | None = None

    def __setstate__(self, state):
        if multiprocessing.parent_process() is not None:
            if self.exit_code is not None:
                os._exit(self.exit_code)
            raise RuntimeError("refusing to rebuild in a worker")
        super().__setstate__(state)


class HardExitInWorker(RefusesToRebuildInWorker):
    exit_code = 3


def structured_loss(model: nn.Module, data) -> torch.Tensor:
    """compute_loss for a dict batch with a constant ``scale`` leaf, or an (x, y) pair."""
    if isinstance(data, dict):
        return F.mse_loss(model(data["inputs"]), data["targets"]) * data["scale"]
    return F.mse_loss(model(data[0]), data[1])


class Unpicklable:
    """Copies (as itself) but cannot be pickled, even by value."""

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        raise TypeError("Unpicklable cannot be pickled")


def task_of(model: nn.Module, loss=scripted_loss) -> AscentTask:
    """Perturb every trainable parameter, with ``loss(model(x), y)`` on (x, y) batches."""
    return AscentTask(model, perturbed_indices(model, model.parameters()), OutputTargetLoss(loss))


def job(step: int, weights: list[torch.Tensor], data, *, rho: float = RHO, seed: int | None = None) -> AscentJob:
    return AscentJob(step=step, weights=weights, batch=data, rho=rho, seed=step if seed is None else seed)


def batch(rows: int, *, command: float | None = None, features: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed + rows)
    x = torch.randn(rows, features, dtype=torch.float64, generator=g)
    y = torch.randn(rows, 3, dtype=torch.float64, generator=g)
    if command is not None:
        y[0, 0] = command
    return x, y


def moved_weights(model: nn.Module, seed: int) -> list[torch.Tensor]:
    """Weights as training would have moved them: the worker must use these, not its own."""
    g = torch.Generator().manual_seed(seed)
    params = parameters_at(model, perturbed_indices(model, model.parameters()))
    return [p.detach() + 0.1 * torch.randn(p.shape, dtype=p.dtype, generator=g) for p in params]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max((u - v).abs().max().item() for u, v in zip(a, b))


# -- process hygiene helpers


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, deadline_s: float) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if gone(pid):
            return True
        time.sleep(0.02)
    return gone(pid)


def live_children() -> set[int]:
    return {c.pid for c in psutil.Process().children(recursive=True) if not gone(c.pid)}


_CHILDREN_BEFORE: set[int] = set()  # whatever other test modules left running


def stray_children(*allowed: int) -> list[int]:
    """Live child processes started by this module, except ``allowed`` and multiprocessing's
    resource tracker (one per process, shared by every spawn user)."""
    tracker = getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None)
    return sorted(live_children() - _CHILDREN_BEFORE - {tracker, *allowed})


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm"))


def new_shm_of(before: set[str], *pids: int) -> list[str]:
    """/dev/shm names created since ``before`` by these processes (torch names them torch_<pid>_...)."""
    return sorted(n for n in shm_entries() - before if any(f"_{pid}_" in n or n.endswith(f"_{pid}") for pid in pids))


def live_shm_mappings(pid: int) -> list[str]:
    """/dev/shm files mapped by ``pid`` that still have a name (file_descriptor unlinks at once)."""
    with open(f"/proc/{pid}/maps") as f:
        return [line for line in f if "/dev/shm/" in line and "(deleted)" not in line]


# -- the shared worker

LAUNCHER_ENV = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "job"}


@pytest.fixture(scope="module")
def model():
    return make_model()  # train mode: BatchNorm on batch statistics, dropout on; the worker follows


@pytest.fixture(scope="module")
def task(model):
    return task_of(model)


@pytest.fixture(scope="module")
def core():
    return max(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def worker(task, core):
    _CHILDREN_BEFORE.update(live_children())
    saved = {k: os.environ.get(k) for k in LAUNCHER_ENV}
    os.environ.update(LAUNCHER_ENV)  # as under torchrun: the worker must not inherit these
    try:
        p = ProcessPerturber(task, threads=2, cores=[core], timeout_s=30)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield p
    p.close()


# -- results


@process
def test_matches_in_process_perturber_across_batch_sizes(worker, model, task):
    """Same weights, batch and seed -> the same perturbation as the reference, bit for bit in float64.

    16, then 8 (reuses the buffers), then 24 rows (grows them). The main model's BatchNorm
    statistics never move; the reference and the worker both run the model in its train mode,
    dropout drawn from the job's seed.
    """
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = InProcessPerturber(task)
    params = parameters_at(model, task.perturbed)
    for step, rows in enumerate((16, 8, 24)):
        weights = moved_weights(model, seed=step)
        data = batch(rows)
        worker.submit(job(step, weights, data))
        got = worker.collect(timeout=30)
        reference.submit(job(step, weights, data))
        want = reference.collect(timeout=0)
        assert got.step == step
        assert [t.shape for t in got.perturbation] == [p.shape for p in params]
        assert all(t.dtype == torch.float64 and t.device.type == "cpu" for t in got.perturbation)
        assert max_diff(got.perturbation, want.perturbation) <= 1e-12
        norm = math.sqrt(sum(float((t * t).sum()) for t in got.perturbation))
        assert norm == pytest.approx(RHO, rel=1e-9)
        # The rho and the seed are the job's: another rho scales it, another seed other dropout masks.
        reference.submit(job(step, weights, data, rho=2 * RHO))
        assert max_diff(reference.collect().perturbation, [2 * t for t in want.perturbation]) <= 1e-12
        reference.submit(job(step, weights, data, seed=step + 100))
        assert max_diff(reference.collect().perturbation, want.perturbation) > 1e-6
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert int(after["net.1.num_batches_tracked"]) == 0


@process
def test_the_worker_follows_the_main_models_modes_and_buffers(worker, model, task):
    """Modes and BatchNorm statistics are the main model's at every job, never the replica's own.

    A job in train mode moves the replica's running statistics; a forward of the main model
    moves the main model's (BatchNorm's kernel does so without bumping a version counter).
    With the BatchNorm then in eval mode the ascent reads those statistics: the worker must
    use the main model's, as the in-process reference does on the main model itself.
    """
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    reference = InProcessPerturber(task)
    try:
        weights, data = moved_weights(model, 20), batch(8)
        worker.submit(job(20, weights, data))  # train mode: the replica's statistics move
        worker.collect(timeout=30)
        with torch.no_grad():
            model(batch(16, seed=7)[0] * 3.0 + 1.0)  # the main model's statistics move
        assert not torch.equal(model.net[1].running_mean, saved["net.1.running_mean"])
        model.net[1].eval()
        model.net[3].eval()
        for step in (21, 22):  # the second job: the statistics its predecessor left are not used either
            worker.submit(job(step, weights, data))
            got = worker.collect(timeout=30)
            reference.submit(job(step, weights, data))
            want = reference.collect()
            assert max_diff(got.perturbation, want.perturbation) <= 1e-12
        info = worker.worker_info()
        assert info["modes"] == list(module_modes(model)) and info["training"] is True
        assert info["modes"].count(False) == 2
        # Power: the replica's own statistics, or the ones it started with, give another perturbation.
        stale = make_model()
        stale.load_state_dict(saved)
        stale.net[1].eval()
        stale.net[3].eval()
        stale_reference = InProcessPerturber(task_of(stale))
        stale_reference.submit(job(22, weights, data))
        assert max_diff(stale_reference.collect().perturbation, want.perturbation) > 1e-6
        model.eval()
        worker.submit(job(23, weights, data))
        worker.collect(timeout=30)
        assert worker.worker_info()["modes"] == [False] * len(list(model.modules()))
    finally:
        model.train()
        model.load_state_dict(saved)
    worker.submit(job(24, moved_weights(model, 24), batch(8)))
    worker.collect(timeout=30)
    assert worker.worker_info()["modes"] == [True] * len(list(model.modules()))


@process
def test_runs_concurrently_with_the_caller(worker, model):
    worker.submit(job(7, moved_weights(model, 7), batch(8, command=SLEEP)))
    assert not worker.ready()  # the job sleeps 0.5 s: submit came back before it ended
    end = time.monotonic() + 30
    while not worker.ready() and time.monotonic() < end:
        time.sleep(0.01)
    assert worker.ready()
    result = worker.collect(timeout=0)  # ready: collect does not wait
    assert result.step == 7 and result.perturbation is not None
    assert result.compute_time_s >= 0.5
    assert result.started_at is not None and result.ended_at - result.started_at == pytest.approx(
        result.compute_time_s)


@process
def test_worker_threads_cores_and_environment(worker, model, core):
    info = worker.worker_info()
    assert info["pid"] == worker.pid
    assert info["num_threads"] == 2
    assert info["omp_num_threads"] == "2" and info["mkl_num_threads"] == "2"
    assert info["affinity"] == [core]
    assert info["thread_affinities"] and all(c == [core] for c in info["thread_affinities"].values())
    assert info["launcher_variables"] == []
    assert info["parent_death_signal"] == signal.SIGKILL
    assert info["sharing_strategy"] == "file_descriptor"
    # The replica's modules are in the main model's modes (train here), not forced into one.
    assert info["modes"] == list(module_modes(model)) and info["training"] is model.training
    # Under pytest the spawn re-import of __main__ loads no torch: the setup ran before it.
    assert info["torch_loaded_before_setup"] is False


@process
def test_a_worker_started_from_a_model_in_eval_mode_stays_in_it():
    model = make_model().eval()
    with ProcessPerturber(task_of(model)) as p:
        info = p.worker_info()
        assert info["training"] is False and info["modes"] == list(module_modes(model))
        weights, data = moved_weights(model, 0), batch(8)
        p.submit(job(0, weights, data))
        got = p.collect(timeout=30)
        reference = InProcessPerturber(task_of(model))
        reference.submit(job(0, weights, data))
        assert max_diff(got.perturbation, reference.collect().perturbation) <= 1e-12
        assert p.worker_info()["training"] is False


@process
def test_non_finite_gradient_gives_no_perturbation(worker, model):
    worker.submit(job(1, moved_weights(model, 1), batch(8, command=NAN)))
    assert worker.collect(timeout=30).perturbation is None
    worker.submit(job(2, moved_weights(model, 2), batch(8)))  # and the worker goes on
    assert worker.collect(timeout=30).perturbation is not None


@process
def test_remote_exceptions_come_back_and_the_worker_goes_on(worker, model, task):
    reference = InProcessPerturber(task)
    worker.submit(job(3, moved_weights(model, 3), batch(8, command=RAISE)))
    with pytest.raises(WorkerError) as info:
        worker.collect(timeout=30)
    message = str(info.value)
    assert "ValueError" in message and "scripted failure 3000" in message and str(worker.pid) in message
    assert "Traceback" in info.value.remote_traceback and "scripted_loss" in info.value.remote_traceback
    assert info.value.pid == worker.pid and info.value.signal is None

    # wrong feature count: new input buffers, a torch error inside
    worker.submit(job(4, moved_weights(model, 4), batch(8, features=7)))
    with pytest.raises(WorkerError, match=r"RuntimeError: .*mat1 and mat2"):
        worker.collect(timeout=30)

    weights, data = moved_weights(model, 5), batch(12)
    worker.submit(job(5, weights, data))
    reference.submit(job(5, weights, data))
    assert max_diff(worker.collect(timeout=30).perturbation, reference.collect(0).perturbation) <= 1e-12


@process
def test_protocol_misuse_is_refused(worker, model):
    with pytest.raises(RuntimeError, match="without a submitted job"):
        worker.collect(timeout=1)
    assert not worker.ready()
    with pytest.raises(UserInputError, match="got 1 tensors"):
        worker.submit(job(0, moved_weights(model, 0)[:1], batch(4)))
    with pytest.raises(UserInputError, match=r"weights\[0\]: torch.float32"):
        worker.submit(job(0, [w.float() for w in moved_weights(model, 0)], batch(4)))
    # A shape that copy_ would broadcast into the flat buffer without a word.
    broadcastable = [w[..., :1] if w.dim() else w for w in moved_weights(model, 0)]
    with pytest.raises(UserInputError, match=r"weights\[0\]: torch.float64 \(8, 1\), expected torch.float64 \(8, 5\)"):
        worker.submit(job(0, broadcastable, batch(4)))
    with pytest.raises(UserInputError, match="at least one row"):
        worker.submit(job(0, moved_weights(model, 0), (torch.zeros(0, 5, dtype=torch.float64), 3)))
    worker.submit(job(0, moved_weights(model, 0), batch(4)))
    with pytest.raises(RuntimeError, match="pending"):
        worker.submit(job(1, moved_weights(model, 1), batch(4)))
    with pytest.raises(RuntimeError, match="pending"):
        worker.worker_info()
    worker.collect(timeout=30)


@process
def test_a_batch_the_loss_cannot_take_is_the_workers_error_and_the_worker_goes_on(worker, model):
    """The perturber takes any batch structure; a pair whose rows differ fails in the loss, in the
    worker, and comes back as a WorkerError (AsyncSAM refuses such a pair before it gets here)."""
    (x, _), (_, y) = batch(8), batch(6)
    worker.submit(job(0, moved_weights(model, 0), (x, y)))
    with pytest.raises(WorkerError, match="raised"):
        worker.collect(timeout=30)
    worker.submit(job(1, moved_weights(model, 1), batch(8)))  # the worker is still usable
    assert worker.collect(timeout=30).perturbation is not None


@process
def test_batches_of_any_structure_reach_the_worker(model):
    """A dict with a constant leaf, a pair (a new structure), a dict again with more rows."""
    structured = AscentTask(model, perturbed_indices(model, model.parameters()), structured_loss)
    reference = InProcessPerturber(structured)
    (x, y), (x2, y2) = batch(8), batch(12)
    batches = [{"inputs": x, "targets": y, "scale": 2.0}, (x, y), {"inputs": x2, "targets": y2, "scale": 0.5}]
    with ProcessPerturber(structured) as p:  # the shared worker's loss takes pairs only
        for step, data in enumerate(batches):
            weights = moved_weights(model, 30 + step)
            p.submit(job(step, weights, data))
            got = p.collect(timeout=30)
            reference.submit(job(step, weights, data))
            assert max_diff(got.perturbation, reference.collect().perturbation) <= 1e-12


def test_bad_arguments_are_refused_before_any_process_starts(model, task):
    children = live_children()
    with pytest.raises(UserInputError, match="cores"):
        ProcessPerturber(task, cores=[(os.cpu_count() or 1) + 5])
    with pytest.raises(UserInputError, match="threads"):
        ProcessPerturber(task, threads=0)
    with pytest.raises(UserInputError, match="worker_timeout_s"):
        ProcessPerturber(task, timeout_s=float("nan"))
    with pytest.raises(UserInputError, match="worker_start_timeout_s"):
        ProcessPerturber(task, start_timeout_s=0)
    unpicklable = make_model()
    unpicklable.handle = Unpicklable()
    with pytest.raises(WorkerError, match="cannot send the model"):
        ProcessPerturber(task_of(unpicklable))
    lock = threading.Lock()
    with pytest.raises(WorkerError, match="cannot send the loss"):
        ProcessPerturber(task_of(model, lambda out, y: out.sum() if lock else None))
    assert live_children() <= children


def test_a_model_that_cannot_be_copied_is_a_worker_error_before_any_process_starts():
    model = make_model()
    model.lock = threading.Lock()
    children = live_children()
    with pytest.raises(WorkerError, match="model"):
        ProcessPerturber(task_of(model))
    assert live_children() <= children


@process
def test_a_loss_defined_inline_is_sent_by_value():
    model = make_model()
    inline = task_of(model, lambda out, y: F.mse_loss(out, y) * 3.0)
    weights, data = moved_weights(model, 0), batch(8)
    with ProcessPerturber(inline) as p:
        p.submit(job(0, weights, data))
        got = p.collect(timeout=30)
    reference = InProcessPerturber(inline)
    reference.submit(job(0, weights, data))
    assert max_diff(got.perturbation, reference.collect().perturbation) <= 1e-12


# -- lifecycle and failures (each with its own worker)


@process
def test_close_and_garbage_collection_leave_nothing_behind(worker):
    before = shm_entries()
    p = ProcessPerturber(task_of(make_model()))
    pid = p.pid
    p.submit(job(0, moved_weights(make_model(), 0), batch(8)))
    p.collect(timeout=30)
    assert live_shm_mappings(os.getpid()) == [] and live_shm_mappings(pid) == []
    p.close()
    p.close()  # idempotent
    assert gone(pid)
    with pytest.raises(RuntimeError, match="closed"):
        p.submit(job(1, moved_weights(make_model(), 1), batch(8)))

    dropped = ProcessPerturber(task_of(make_model()))  # never closed: the finalizer stops it
    dropped_pid = dropped.pid
    del dropped
    gc.collect()
    assert gone(dropped_pid)
    assert stray_children(worker.pid) == []
    assert new_shm_of(before, os.getpid(), pid, dropped_pid) == []


@process
def test_killed_worker_is_reported_with_pid_and_signal(worker):
    before = shm_entries()
    p = ProcessPerturber(task_of(make_model()), timeout_s=60)
    pid = p.pid
    x, y = batch(8, command=SLEEP)
    p.submit(job(0, moved_weights(make_model(), 0), (x, y)))
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerError) as info:
        p.collect(timeout=60)  # a death, not a timeout: a hang would be reported after 60 s
    assert info.value.pid == pid and info.value.signal == signal.SIGKILL
    assert "SIGKILL" in str(info.value) and str(pid) in str(info.value) and "hung" not in str(info.value)
    with pytest.raises(WorkerError, match="no longer usable.*SIGKILL"):
        p.submit(job(1, moved_weights(make_model(), 1), batch(8)))
    assert p.ready() is False
    p.close()
    assert gone(pid)
    assert stray_children(worker.pid) == []
    assert new_shm_of(before, os.getpid(), pid) == []


@process
def test_worker_killed_while_idle_fails_the_next_submit(worker):
    p = ProcessPerturber(task_of(make_model()))
    pid = p.pid
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid, 30)
    with pytest.raises(WorkerError) as info:
        p.submit(job(0, moved_weights(make_model(), 0), batch(8)))
        p.collect(timeout=30)  # a pipe may still take the message; the collect then sees the death
    assert info.value.signal == signal.SIGKILL and info.value.pid == pid
    p.close()
    assert stray_children(worker.pid) == []


@process
def test_hung_worker_times_out_and_is_stopped(worker):
    p = ProcessPerturber(task_of(make_model()), timeout_s=1.0)
    pid = p.pid
    x, y = batch(8, command=HANG)
    p.submit(job(0, moved_weights(make_model(), 0), (x, y)))
    with pytest.raises(WorkerError, match=rf"pid {pid} hung") as info:
        p.collect(timeout=60)  # timeout_s=1 bounds the job
    assert info.value.pid == pid
    assert wait_gone(pid, 10)
    p.close()
    assert stray_children(worker.pid) == []


@process
@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (RefusesToRebuildInWorker, r"failed to start: RuntimeError: refusing to rebuild in a worker"),
        (HardExitInWorker, r"exited with code 3 during start"),
    ],
)
def test_start_failure_names_the_cause(worker, cls, expected):
    torch.manual_seed(0)
    with pytest.raises(WorkerError, match=expected) as info:
        ProcessPerturber(task_of(cls().double()), start_timeout_s=60)
    assert info.value.pid is not None and gone(info.value.pid)
    if cls is RefusesToRebuildInWorker:
        assert "__setstate__" in info.value.remote_traceback
    assert stray_children(worker.pid) == []


PARENT_SCRIPT = """
import sys, threading
sys.path.insert(0, {root!r})
from tests.cpu.test_process_worker import make_model, batch, job, moved_weights, task_of, HANG
from asam_tune.perturbers.process_parent import ProcessPerturber

box = {{}}
def start():
    box["p"] = ProcessPerturber(task_of(make_model()))
if {from_thread}:  # no parent-death signal then: the worker's own watcher must notice
    t = threading.Thread(target=start)
    t.start()
    t.join()
else:
    start()
p = box["p"]
armed = p.worker_info()["parent_death_signal"]
if {busy}:
    x, y = batch(4, command=HANG)
    p.submit(job(0, moved_weights(make_model(), 0), (x, y)))
print(p.pid, armed, flush=True)
threading.Event().wait(600)
"""


@process
def test_worker_dies_with_its_sigkilled_parent():
    """Idle worker started from the main thread (parent-death signal, pipe EOF), and a worker
    started from another thread and busy in a job (its parent watcher alone)."""
    root = str(Path(__file__).parents[2])
    cases = {"idle, main thread": (False, False), "busy, other thread": (True, True)}
    parents = {}
    for name, (from_thread, busy) in cases.items():
        code = PARENT_SCRIPT.format(root=root, from_thread=from_thread, busy=busy)
        parents[name] = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        for name, parent in parents.items():
            line = parent.stdout.readline()
            assert line, f"{name}: the parent script ended before starting its worker"
            pid, armed = (int(v) for v in line.split())
            assert armed == (0 if cases[name][0] else signal.SIGKILL), name
            assert not gone(pid), name
            parent.kill()  # SIGKILL
            parent.wait(30)
            assert wait_gone(pid, PARENT_DEATH_DEADLINE_S), f"{name}: worker {pid} outlived its parent"
    finally:
        for parent in parents.values():
            if parent.poll() is None:
                parent.kill()
                parent.wait(30)
            parent.stdout.close()


# -- the CUDA worker's CPU-testable part: the job thread and the argument checks


def test_job_thread_runs_jobs_in_the_background_and_keeps_going_after_errors():
    runner = JobThread("test-runner")
    release = threading.Event()
    runner.start(lambda: release.wait(30) and 42)
    assert not runner.done()  # start() returned while the job waits
    release.set()
    assert runner.wait(time.monotonic() + 30) == ("ok", 42)

    def fails():
        raise ValueError("scripted failure")

    runner.start(fails)
    kind, exc, tb = runner.wait(time.monotonic() + 30)
    assert kind == "error" and isinstance(exc, ValueError) and "fails" in tb

    blocked = threading.Event()
    runner.start(lambda: blocked.wait(30))
    assert runner.wait(time.monotonic() + 0.05) is None  # the deadline came first
    blocked.set()
    assert runner.wait(time.monotonic() + 30) == ("ok", True)
    assert runner.stop(30) and not runner.is_alive()


def test_stream_perturber_refuses_what_it_cannot_run():
    task = task_of(make_model())
    with pytest.raises(UserInputError, match="needs a CUDA device"):
        StreamPerturber(task, device="cpu", secondary_stream=False)
    with pytest.raises(UserInputError, match="worker_timeout_s"):
        StreamPerturber(task, device="cpu", secondary_stream=False, timeout_s=-1.0)
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="CUDA is not available"):
            StreamPerturber(task, device="cuda:0", secondary_stream=True)
    else:  # a model on the CPU has no main GPU stream to share
        with pytest.raises(UserInputError, match="secondary_stream=True shares the model's own device"):
            StreamPerturber(task, device="cuda:0", secondary_stream=True)
