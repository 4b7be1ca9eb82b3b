"""AsyncSAM under torch.distributed: the core rule, and two gloo ranks with a worker process each.

The core rule (``divide_cores``) is tested as a pure function (milliseconds). The two-rank
tests share one ``torch.multiprocessing`` launch (module fixture): each rank sets the variables
torchrun sets, joins a gloo group through ``env://`` and trains a float64 BatchNorm convnet
under DDP through several scenarios; the parent compares the ranks with each other and with a
single-process reference that runs the same global batch. At the end, smoke tests run the
examples in docs/examples, the DDP one under a real ``torchrun``.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from asam_tune.errors import UserInputError, WorkerError
from asam_tune.fingerprint import usable_core_ids
from asam_tune.records.rho_rule import DEFAULT_RHO_RULE
from asam_tune.runtime.distributed import default_main_cores, divide_cores, rank_cores
from tests.unit.test_async_sam import (  # noqa: F401 (one_thread: autouse fixture)
    RHO, ScriptedPerturber, ascent, batches, bn_convnet, max_diff, one_thread, reference_sam, sgd,
)

REPO = Path(__file__).resolve().parents[2]
RANKS = 2
STEPS = 8
PER_RANK = 8  # samples per rank and step: the global batch is RANKS * PER_RANK
BP = 4
KILL_AFTER = 3  # rank 1 kills its worker once this many steps are done
RAISE_KILL_AFTER = 2
# The rho each rank applies: the default rule at b_p of the rank's own batch (rho is "rho at
# the full batch", and a rank's full batch is its shard).
RANK_RHO = DEFAULT_RHO_RULE.rho_for(RHO, BP, PER_RANK)


# ----------------------------------------------------------------------------- the core rule


def _pairwise_disjoint(sets) -> bool:
    seen: set[int] = set()
    for s in sets:
        if seen & set(s):
            return False
        seen |= set(s)
    return True


def test_enough_cores_gives_every_rank_disjoint_sets_and_deals_the_rest_to_the_mains():
    pool = tuple(range(16))
    shares = divide_cores(pool, 2, main_cores=1, reserved_cores=1, worker_threads=4)
    assert [len(s.worker) for s in shares] == [4, 4]
    assert not any(s.shared for s in shares)
    assert _pairwise_disjoint([part for s in shares for part in (s.main, s.worker)])
    # 16 - 2 * 6 = 4 cores left over: two more per main set; nothing is left idle.
    assert [len(s.main) for s in shares] == [4, 4]
    assert sorted(c for s in shares for c in (*s.main, *s.worker)) == list(pool)
    # Rank 0: main core, reserved core, then its worker; as the single-rank planner orders them.
    assert shares[0].worker == (2, 3, 4, 5) and shares[0].main == (0, 1, 6, 7)


def test_cores_nearest_each_ranks_gpu_come_first():
    socket0, socket1 = tuple(range(0, 8)), tuple(range(8, 16))
    # Rank 0's GPU hangs off the second socket, rank 1's off the first.
    shares = divide_cores(tuple(range(16)), 2, main_cores=1, worker_threads=3, nearest=[socket1, socket0])
    assert set(shares[0].worker) <= set(socket1) and set(shares[1].worker) <= set(socket0)
    assert shares[0].main[0] in socket1 and shares[1].main[0] in socket0
    assert _pairwise_disjoint([part for s in shares for part in (s.main, s.worker)])


def test_two_core_machine_shares_cores_but_keeps_the_workers_apart():
    # This machine's case: 2 ranks x (1 main + 1 worker) on 2 cores.
    shares = divide_cores((0, 1), 2, main_cores=1, worker_threads=1)
    assert all(s.shared for s in shares)
    assert [s.worker for s in shares] == [(0,), (1,)]  # one worker per core
    assert [s.main for s in shares] == [(0,), (1,)]  # the mains overlap the workers (not pinned)
    # One core for two ranks: everything on it.
    assert divide_cores((5,), 2, main_cores=1, worker_threads=2) == [
        type(shares[0])(main=(5,), worker=(5,), shared=True)] * 2
    # 3 cores for 4 threads: the workers still get a core each, the mains wrap around.
    three = divide_cores((0, 1, 2), 2, main_cores=1, worker_threads=1)
    assert [s.worker for s in three] == [(0,), (1,)] and [s.main for s in three] == [(2,), (0,)]


@settings(max_examples=200, deadline=None)
@given(pool=st.sets(st.integers(0, 63), min_size=1, max_size=24), ranks=st.integers(1, 6),
       main=st.integers(1, 3), reserved=st.integers(0, 2), worker=st.integers(1, 4))
def test_division_invariants(pool, ranks, main, reserved, worker):
    shares = divide_cores(sorted(pool), ranks, main_cores=main, reserved_cores=reserved, worker_threads=worker)
    assert len(shares) == ranks
    for s in shares:
        assert s.main and s.worker and set(s.main) | set(s.worker) <= pool
    enough = len(pool) >= ranks * (main + reserved + worker)
    assert all(s.shared != enough for s in shares)
    if enough:
        assert all(len(s.worker) == worker and len(s.main) >= main + reserved for s in shares)
        assert _pairwise_disjoint([part for s in shares for part in (s.main, s.worker)])
    # Workers stay apart exactly as long as the pool holds all of them.
    if ranks > 1:
        assert _pairwise_disjoint([s.worker for s in shares]) == (len(pool) >= ranks * worker)


def test_rank_cores_on_this_machines_usable_cores():
    usable = usable_core_ids()
    shares = [rank_cores(usable, r, 2, main_cores=1, worker_threads=1) for r in range(2)]
    assert shares == divide_cores(usable, 2, main_cores=1, worker_threads=1)
    assert all(set(s.worker) <= set(usable) for s in shares)
    if len(usable) >= 2:
        assert _pairwise_disjoint([s.worker for s in shares])
    assert default_main_cores(16, 2, 3) == 5 and default_main_cores(2, 2, 1) == 1


@pytest.mark.parametrize("call, bad", [
    (lambda: rank_cores((0, 1), 2, 2, main_cores=1, worker_threads=1), "local_rank: 2"),
    (lambda: rank_cores((0, 1), 0, 0, main_cores=1, worker_threads=1), "local_world_size: 0"),
    (lambda: divide_cores((), 1, main_cores=1, worker_threads=1), "pool: ()"),
    (lambda: divide_cores((0, -1), 1, main_cores=1, worker_threads=1), "pool: (0, -1)"),
    (lambda: divide_cores((0,), 1, main_cores=0, worker_threads=1), "main_cores: 0"),
    (lambda: divide_cores((0,), 1, main_cores=1, worker_threads=True), "worker_threads: True"),
    (lambda: divide_cores((0,), 2, main_cores=1, worker_threads=1, nearest=[(0,)]), "1 entries for 2 ranks"),
])
def test_bad_arguments_are_one_line_errors_with_the_value(call, bad):
    with pytest.raises(UserInputError, match=re.escape(bad)):
        call()


# ----------------------------------------------------------------------------- who shares a node


def _fake_group(monkeypatch, infos, me):
    """Rank ``me`` of a group whose ranks report ``infos`` (node, usable cores) to all_gather_object."""
    from asam_tune.runtime import distributed

    monkeypatch.setattr(distributed.dist, "get_world_size", lambda group=None: len(infos))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda group=None: me)
    monkeypatch.setattr(distributed, "node_id", lambda: infos[me][0])

    def all_gather_object(out, obj, group=None):
        for i, (node, pool) in enumerate(infos):
            out[i] = obj if i == me else {**obj, "node": node, "pool": tuple(pool)}

    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)
    return lambda **kw: distributed.place_rank(object(), usable=infos[me][1], apply=False, **kw)


def test_ranks_are_divided_per_node(monkeypatch):
    eight = range(8)
    place = _fake_group(monkeypatch, [("a", eight), ("a", eight), ("b", eight), ("b", eight)], me=3)
    placement = place(worker_threads=2, main_cores=1)
    assert (placement.local_rank, placement.local_world_size) == (1, 2)
    assert placement.cores == divide_cores(eight, 2, main_cores=1, worker_threads=2)[1]
    assert not placement.main_pinned  # apply=False


def test_ranks_the_launcher_already_separated_keep_their_own_cores(monkeypatch):
    # Slurm with --cpu-bind=cores: two ranks on one node, each with its own mask.
    place = _fake_group(monkeypatch, [("a", range(0, 4)), ("a", range(4, 8))], me=1)
    placement = place(worker_threads=2)
    assert placement.local_world_size == 1 and set(placement.cores.worker) <= set(range(4, 8))
    assert placement.main_threads == default_main_cores(4, 1, 2) == 2


def test_ranks_that_disagree_on_sizes_or_ranks_per_node_are_told(monkeypatch):
    from asam_tune.runtime import distributed

    place = _fake_group(monkeypatch, [("a", range(4)), ("a", range(4))], me=0)
    with pytest.warns(RuntimeWarning, match="--nproc-per-node 2"):
        place(worker_threads=1, main_cores=1, expected_local_world_size=4)
    original = distributed.dist.all_gather_object

    def disagreeing(out, obj, group=None):
        original(out, obj, group)
        out[1] = {**out[1], "sizes": (2, 0, 1)}

    monkeypatch.setattr(distributed.dist, "all_gather_object", disagreeing)
    with pytest.raises(UserInputError, match=r"ranks disagree on .*\(2, 0, 1\)"):
        place(worker_threads=1, main_cores=1)


@pytest.mark.parametrize("backend, device, expected", [
    ("gloo", "cpu", "cpu"), ("nccl", "cuda:1", "cuda:1"), ("cpu:gloo,cuda:nccl", "cuda:1", "cpu"),
])
def test_the_agreement_flag_lives_where_the_backend_reduces(monkeypatch, backend, device, expected):
    from asam_tune.runtime import distributed

    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: backend)
    assert distributed._agreement_device(object(), torch.device(device)) == torch.device(expected)


# ----------------------------------------------------------------------------- the lockstep logic, one process


class ScriptedAgreement:
    """Stands in for FailureAgreement: reports another rank's failure at a chosen call."""

    def __init__(self, other_rank_fails_at_call=None):
        self.calls, self.seconds, self.flags = 0, 0.0, []
        self.fails_at = other_rank_fails_at_call

    def agree(self, failed):
        self.flags.append(failed)
        self.calls += 1
        if failed:
            return 0  # this process plays rank 0
        return 1 if self.calls == self.fails_at else None


def _lockstep_sam(model, perturber, agreement):
    from asam_tune.runtime import AsyncSAM

    sam = AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO, perturbation_batch_size=BP, rho_rule="none",
                   perturber=perturber)
    sam._worker.agreement = agreement  # what a process group of several ranks sets up
    return sam


def test_another_ranks_failure_switches_this_rank_in_the_agreed_step():
    data = batches((1, 6, 6), steps=STEPS)
    model, reference = bn_convnet(), bn_convnet()
    agreement = ScriptedAgreement(other_rank_fails_at_call=4)  # the agreement of step 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _lockstep_sam(model, ScriptedPerturber(), agreement) as sam:
            for x, y in sam.lookahead(data):
                sam.step(x, y)
            stats = sam.stats()
    assert agreement.calls == 4 and not any(agreement.flags)  # none after the switch
    assert stats.fallbacks == 1 and stats.staleness_histogram == {0: 1 + STEPS - 3, 1: 2}
    assert [str(w.message) for w in caught] == [
        "asam-tune: the perturbation worker of rank 1 failed; every rank continues with synchronous SAM from step 3"]
    reference_sam(reference, sgd(reference), data, RHO, BP, lag=[0, 1, 1] + [0] * (STEPS - 3))
    assert max_diff(model, reference) <= 1e-12


def test_a_failure_after_the_last_agreement_is_reported_when_closing():
    # One batch: its step agrees first, then computes e_0 synchronously, and the worker dies.
    data = batches((1, 6, 6), steps=1)
    model = bn_convnet()
    agreement = ScriptedAgreement()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _lockstep_sam(model, ScriptedPerturber(fail_on_collect=1), agreement) as sam:
            for x, y in sam.lookahead(data):
                sam.step(x, y)  # bridged in-process: the step still gets its perturbation
            assert sam.stats().staleness_histogram == {0: 1} and caught == []
    assert agreement.flags == [False]
    assert len(caught) == 1 and "after the last agreed step" in str(caught[0].message)


# ----------------------------------------------------------------------------- two ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batches():
    return batches((1, 6, 6), steps=STEPS, batch=RANKS * PER_RANK)


class FailingSubmit(ScriptedPerturber):
    """A scripted worker whose ``n``-th submit finds it dead (a hand-over to a killed worker)."""

    def __init__(self, *, fail_on_submit):
        super().__init__()
        self.submits, self.fail_on_submit = 0, fail_on_submit

    def submit(self, job):
        self.submits += 1
        if self.submits == self.fail_on_submit:
            raise WorkerError("perturbation worker died", pid=4242, signal=9)
        super().submit(job)


def _scripted(rank: int, script):
    """Rank 1's worker fails as scripted (("submit" | "collect", n)); rank 0's never does."""
    if rank != 1:
        return ScriptedPerturber()
    kind, n = script
    return FailingSubmit(fail_on_submit=n) if kind == "submit" else ScriptedPerturber(fail_on_collect=n)


def _train_rank(rank: int, *, staleness=1, kill_after=None, on_failure="fallback", script=None) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from asam_tune import affinity
    from asam_tune.runtime import AsyncSAM

    model = DistributedDataParallel(bn_convnet())
    shard = [(x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK])
             for x, y in _global_batches()]
    worker = {"perturbation_device": "cpu", "threads": 1} if script is None \
        else {"perturber": _scripted(rank, script)}
    out: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO, perturbation_batch_size=BP, staleness=staleness,
                      on_worker_failure=on_failure, worker_timeout_s=30.0, **worker) as sam:
            agreement = sam.failure_agreement  # None once a switch leaves nothing to agree on
            if script is None:
                info = sam._worker.perturber.worker_info()
                out.update(worker_pid=sam.worker_pid, worker_launcher_variables=info["launcher_variables"],
                           worker_affinity=info["affinity"], main_threads=torch.get_num_threads(),
                           rank_launcher_variables=affinity.launcher_variables(os.environ),
                           placement=dataclasses.asdict(sam.placement))
            try:
                for i, (x, y) in enumerate(sam.lookahead(shard)):
                    sam.step(x, y)
                    if rank == 1 and kill_after is not None and i == kill_after - 1:
                        os.kill(sam.worker_pid, signal.SIGKILL)
            except WorkerError as exc:
                out.update(raised_in_step=sam.step_count, error=str(exc))
            stats = sam.stats()
            out.update(steps=stats.steps, histogram=stats.staleness_histogram, fallbacks=stats.fallbacks,
                       rho_applied=stats.rho_applied,
                       agreements=agreement.calls, agreement_after=sam.failure_agreement is not None)
    out["failure_warnings"] = [str(w.message) for w in caught if "failed" in str(w.message)]
    out["params"] = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    return out


def _rank_entry(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    # What torchrun sets: the workers must never see these.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(RANKS),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(RANKS))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        results = {
            "staleness0": _train_rank(rank, staleness=0),
            "staleness1": _train_rank(rank, staleness=1),
            "killed": _train_rank(rank, staleness=1, kill_after=KILL_AFTER),
            "killed_raise": _train_rank(rank, staleness=1, kill_after=RAISE_KILL_AFTER, on_failure="raise"),
            # Deterministic failure points: rank 1's worker is found dead when step 2 hands it
            # the batch of step 3 (its 4th submit), or in step 0's synchronous computation.
            "submit_fails": _train_rank(rank, script=("submit", 4)),
            "step0_fails": _train_rank(rank, script=("collect", 1)),
        }
    finally:
        gc.collect()  # DDP models sit in reference cycles: free them before the group (gloo aborts otherwise)
        dist.destroy_process_group()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    context = mp.start_processes(_rank_entry, args=(_free_port(), str(out)), nprocs=RANKS, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 150
    while not context.join(timeout=1):  # raises with the rank's traceback if a rank failed
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the two ranks did not finish within 150 s")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(RANKS)]


def reference_ddp(data, lag, rank_local=True):
    """The same global batches in one process: rank r's e from its own shard, gradients averaged.

    Step t applies e computed at w_{t - lag[t]}. ``rank_local`` False takes every rank's e from
    the first samples of the global batch instead (what the runtime must not do).
    """
    model = bn_convnet()
    optimizer = sgd(model)
    params = list(model.parameters())
    history = []
    for t, (x, y) in enumerate(data):
        current = [p.detach().clone() for p in params]
        history.append(current)
        mean = [torch.zeros_like(p) for p in params]
        for xs, ys in zip(x.chunk(RANKS), y.chunk(RANKS)):
            xa, ya = (xs, ys) if rank_local else (x, y)
            e = ascent(model, history[t - lag[t]], xa[:BP], ya[:BP], RANK_RHO)
            with torch.no_grad():
                for p, c, ei in zip(params, current, e):
                    p.copy_(c + ei)
            grads = torch.autograd.grad(F.cross_entropy(model(xs), ys), params)
            for m, g in zip(mean, grads):
                m.add_(g / RANKS)
        with torch.no_grad():
            for p, c in zip(params, current):
                p.copy_(c)
        for p, g in zip(params, mean):
            p.grad = g
        optimizer.step()
    return dict(model.named_parameters())


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].detach() - b[k].detach()).abs().max().item() for k in a)


def _ranks_equal(results, name) -> bool:
    a, b = (r[name]["params"] for r in results)
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("staleness", [0, 1])
def test_ranks_end_equal_and_match_the_single_process_reference(ranks, staleness):
    name = f"staleness{staleness}"
    assert _ranks_equal(ranks, name)
    lag = [0] * STEPS if staleness == 0 else [0] + [1] * (STEPS - 1)
    reference = reference_ddp(_global_batches(), lag)
    assert _max_diff(ranks[0][name]["params"], reference) <= 1e-10
    # Not rank-local (every rank's ascent on rank 0's samples) is measurably different.
    assert _max_diff(ranks[0][name]["params"], reference_ddp(_global_batches(), lag, rank_local=False)) > 1e-6
    for r in ranks:
        assert r[name]["steps"] == STEPS and r[name]["fallbacks"] == 0 and r[name]["agreements"] == STEPS
        assert r[name]["agreement_after"] and r[name]["rho_applied"] == RANK_RHO > RHO
        assert r[name]["failure_warnings"] == []


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_workers_never_see_the_launcher_variables_and_get_disjoint_cores(ranks):
    for r in ranks:
        run = r["staleness1"]
        assert {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} <= set(run["rank_launcher_variables"])
        assert run["worker_launcher_variables"] == []
        assert run["worker_affinity"] == list(run["placement"]["cores"]["worker"])
        assert run["main_threads"] == run["placement"]["main_threads"]
        assert run["placement"]["local_world_size"] == RANKS
    workers = [set(r["staleness1"]["placement"]["cores"]["worker"]) for r in ranks]
    if len(usable_core_ids()) >= RANKS:
        assert not workers[0] & workers[1]


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_killed_worker_on_rank_1_switches_both_ranks_in_the_same_step(ranks):
    runs = [r["killed"] for r in ranks]
    assert all(run["steps"] == STEPS and run["fallbacks"] == 1 for run in runs)
    assert runs[0]["histogram"] == runs[1]["histogram"]  # the same step synchronous on both ranks
    # The job for step KILL_AFTER was in flight: it died with the worker (switch at KILL_AFTER),
    # or had finished and the next hand-over failed (switch one step later).
    switch = runs[0]["histogram"][1] + 1
    assert switch in (KILL_AFTER, KILL_AFTER + 1)
    assert _ranks_equal(ranks, "killed")
    # One agreement per step up to the one that switched; none after it.
    assert all(run["agreements"] == switch + 1 and not run["agreement_after"] for run in runs)
    lag = [0] + [1] * (switch - 1) + [0] * (STEPS - switch)
    assert _max_diff(runs[0]["params"], reference_ddp(_global_batches(), lag)) <= 1e-10
    assert len(runs[0]["failure_warnings"]) == 1 and "rank 1" in runs[0]["failure_warnings"][0]
    assert len(runs[1]["failure_warnings"]) == 1 and "signal 9" in runs[1]["failure_warnings"][0]
    assert all(f"from step {switch}" in run["failure_warnings"][0] for run in runs)


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_with_raise_both_ranks_raise_in_the_same_step_and_no_worker_survives(ranks):
    runs = [r["killed_raise"] for r in ranks]
    assert runs[0]["raised_in_step"] == runs[1]["raised_in_step"] in (RAISE_KILL_AFTER, RAISE_KILL_AFTER + 1)
    assert "rank 1" in runs[0]["error"] and "SIGKILL" in runs[1]["error"]
    pids = [r[name]["worker_pid"] for r in ranks for name in r if "worker_pid" in r[name]]
    assert all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE for pid in pids)


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("name, switch", [("submit_fails", 3), ("step0_fails", 1)])
def test_a_failure_found_after_the_steps_agreement_switches_every_rank_at_the_next_step(ranks, name, switch):
    runs = [r[name] for r in ranks]
    expected = {0: 1 + STEPS - switch, 1: switch - 1} if switch > 1 else {0: STEPS}
    assert [run["histogram"] for run in runs] == [expected, expected]
    assert all(run["steps"] == STEPS and run["fallbacks"] == 1 and len(run["failure_warnings"]) == 1 for run in runs)
    assert all(f"from step {switch}" in run["failure_warnings"][0] for run in runs)
    assert _ranks_equal(ranks, name)
    lag = [0] + [1] * (switch - 1) + [0] * (STEPS - switch)
    assert _max_diff(runs[0]["params"], reference_ddp(_global_batches(), lag)) <= 1e-10


# ----------------------------------------------------------------------------- the examples


def _run(command: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


SINGLE_PROCESS_EXAMPLES = ("plain_loop.py", "amp_loop.py")


@pytest.fixture(scope="module")
def single_process_examples(tmp_path_factory):
    """Both examples started at once, their output to files: each is mostly start-up (its main
    process, then its worker) on one core at a time, so side by side they take little more
    than one."""
    folder = tmp_path_factory.mktemp("examples")
    runs = {}
    for example in SINGLE_PROCESS_EXAMPLES:
        out, err = folder / f"{example}.out", folder / f"{example}.err"
        with open(out, "w") as stdout, open(err, "w") as stderr:
            process = subprocess.Popen([sys.executable, f"docs/examples/{example}", "--steps", "4"], cwd=REPO,
                                       stdout=stdout, stderr=stderr, text=True)
        runs[example] = (process, out, err)
    yield runs
    for process, _, _ in runs.values():
        if process.poll() is None:
            process.kill()
            process.wait(30)


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("example", SINGLE_PROCESS_EXAMPLES)
def test_single_process_examples_run(single_process_examples, example):
    process, out, err = single_process_examples[example]
    returncode = process.wait(100)
    assert returncode == 0, err.read_text()
    stdout = out.read_text()
    assert "4 steps" in stdout and "staleness {0: 1, 1: 3}" in stdout


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
            str(_free_port()), "docs/examples/ddp_torchrun.py", *args]


def _worker_pids(output: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"worker pid (\d+)", output)]


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ddp_example_under_torchrun_runs():
    done = _run(_torchrun("--steps", "6"), timeout=100)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "6 steps on 2 ranks" in done.stdout and "fallbacks 0" in done.stdout
    assert len(_worker_pids(done.stdout)) == 2


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_failing_rank_is_the_recorded_root_cause_and_no_worker_outlives_torchrun():
    done = _run(_torchrun("--steps", "8", "--crash-rank", "1", "--crash-step", "2"), timeout=100)
    assert done.returncode != 0
    # @record wrote the rank's error file: torchrun's root cause holds the exception, not just
    # an exit code (the rank's own traceback on stderr would not tell the two apart).
    root_cause = done.stderr.split("Root Cause")[-1]
    assert "error.json" in root_cause and "injected failure on rank 1 at step 2" in root_cause
    pids = _worker_pids(done.stdout)
    assert len(pids) == 2
    assert all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE for pid in pids)
