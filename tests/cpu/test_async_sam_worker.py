"""AsyncSAM with the real CPU worker process, and resume in a fresh Python process.

Each test starts at most one worker (about a second on a loaded 2-core machine).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import psutil
import pytest
import torch
import torch.nn.functional as F

from asam_tune.errors import UserInputError, WorkerError
from asam_tune.records.rho_rule import DEFAULT_RHO_RULE
from asam_tune.runtime import AsyncSAM
from tests.unit.test_async_sam import RHO, batches, bn_convnet, max_diff, one_thread, reference_sam, sgd  # noqa: F401

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

STEPS = 8
BP = 4


def _children() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def _gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if pid not in _children():
            return True
        time.sleep(0.05)
    return False


def _worker_sam(model, **kwargs) -> AsyncSAM:
    return AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO, perturbation_device="cpu", threads=1,
                    perturbation_batch_size=BP, worker_timeout_s=60.0, **kwargs)


def test_process_worker_staleness1_equals_the_serial_reference_and_leaves_no_child():
    data = batches((1, 6, 6), steps=STEPS)
    model, reference = bn_convnet(), bn_convnet()
    with _worker_sam(model, rho_rule="none") as sam:  # the reference's rho at b_p = 4 of 8
        pid = sam.worker_pid
        assert pid is not None and pid in _children()
        for x, y in sam.lookahead(data):
            sam.step(x, y)
        stats = sam.stats()
    assert _gone(pid)
    reference_sam(reference, sgd(reference), data, RHO, BP, lag=[0] + [1] * (STEPS - 1))
    assert max_diff(model, reference) <= 1e-10
    assert stats.staleness_histogram == {0: 1, 1: STEPS - 1}
    assert stats.fallbacks == 0 and stats.steps == STEPS and stats.perturbation_batch_size == BP
    assert stats.worker_compute_median_s > 0 and stats.rho_applied == RHO


def test_process_worker_applies_the_default_rho_rule():
    data = batches((1, 6, 6), steps=4)
    model, reference = bn_convnet(), bn_convnet()
    rho = DEFAULT_RHO_RULE.rho_for(RHO, BP, 8)
    assert rho > RHO
    with _worker_sam(model) as sam:
        assert sam.rho_at(BP, 8) == rho
        for x, y in sam.lookahead(data):
            sam.step(x, y)
        assert sam.stats().rho_applied == rho and sam.stats().fallbacks == 0
    reference_sam(reference, sgd(reference), data, rho, BP, lag=[0, 1, 1, 1])
    assert max_diff(model, reference) <= 1e-10


def test_sigkilled_worker_warns_once_and_training_continues_as_synchronous_sam():
    data = batches((1, 6, 6), steps=STEPS)
    model = bn_convnet()
    killed_after = 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _worker_sam(model, rho_rule="none") as sam:
            pid = sam.worker_pid
            for i, (x, y) in enumerate(sam.lookahead(data)):
                sam.step(x, y)
                if i == killed_after - 1:
                    os.kill(pid, signal.SIGKILL)
            stats = sam.stats()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert f"pid {pid}" in messages[0] and f"signal {int(signal.SIGKILL)}" in messages[0]
    assert stats.fallbacks == 1 and stats.steps == STEPS
    assert sum(stats.staleness_histogram.values()) == STEPS
    assert _gone(pid)
    # The job in flight at the kill may or may not have answered first: step 3 is then either
    # recomputed synchronously, or applied one step stale and step 4 is the first synchronous one.
    candidates = []
    for synchronous_from in (killed_after, killed_after + 1):
        reference = bn_convnet()
        lag = [0] + [1] * (synchronous_from - 1) + [0] * (STEPS - synchronous_from)
        reference_sam(reference, sgd(reference), data, RHO, BP, lag=lag)
        candidates.append(max_diff(model, reference))
    assert min(candidates) <= 1e-10, candidates


def test_a_batch_with_fewer_labels_than_inputs_is_a_user_error_not_a_worker_failure():
    model = bn_convnet()
    (x0, y0), (x1, y1) = batches((1, 6, 6), steps=2)
    with AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO, perturbation_device="cpu", threads=1,
                  worker_timeout_s=60.0) as sam:  # the whole batch goes to the worker
        with pytest.raises(UserInputError, match="rows"):
            for x, y in sam.lookahead([(x0, y0), (x1, y1[:-1])]):
                sam.step(x, y)
        assert sam.stats().fallbacks == 0


def test_a_worker_that_fails_at_start_falls_back_with_one_warning_or_raises():
    # The model pickles, but rebuilding it inside the worker fails: a start failure in the worker
    # process. "fallback": one warning, then synchronous SAM from step 0; "raise": the WorkerError.
    from tests.cpu.test_process_worker import RefusesToRebuildInWorker

    def refusing_model():
        torch.manual_seed(0)
        return RefusesToRebuildInWorker().double()

    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    data = [(x + i, y) for i in range(4)]
    children = _children()
    model = refusing_model()
    with pytest.raises(WorkerError, match="refusing to rebuild in a worker"):
        AsyncSAM(model, sgd(model), F.mse_loss, rho=RHO, perturbation_device="cpu", on_worker_failure="raise")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with AsyncSAM(model, sgd(model), F.mse_loss, rho=RHO, perturbation_device="cpu",
                      perturbation_batch_size=BP, worker_timeout_s=60.0) as sam:
            assert sam.staleness == 0 and sam.worker_pid is None
            for batch in sam.lookahead(data):
                sam.step(*batch)
            stats = sam.stats()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "refusing to rebuild" in messages[0] and "synchronous SAM" in messages[0]
    assert stats.fallbacks == 1 and stats.staleness_histogram == {0: len(data)}
    assert _children() <= children
    # Synchronous SAM at the rule's rho: the same as an in-process run from the start.
    plain = refusing_model()
    with AsyncSAM(plain, sgd(plain), F.mse_loss, rho=RHO, staleness=0, perturbation_batch_size=BP) as sam:
        for batch in sam.lookahead(data):
            sam.step(*batch)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))


def test_exception_inside_the_block_leaves_no_child_process():
    model = bn_convnet()
    x, y = batches((1, 6, 6), steps=1)[0]
    with pytest.raises(RuntimeError, match="user code failed"):
        with _worker_sam(model) as sam:
            pid = sam.worker_pid
            sam.step(x, y)
            raise RuntimeError("user code failed")
    assert _gone(pid)


def test_non_blocking_with_the_real_worker_reports_the_staleness_it_ran_at():
    data = batches((1, 6, 6), steps=STEPS)
    model = bn_convnet()
    with _worker_sam(model, staleness="non_blocking") as sam:
        pid = sam.worker_pid
        for x, y in sam.lookahead(data):
            loss = sam.step(x, y)
            assert torch.isfinite(loss)
        stats = sam.stats()
    assert _gone(pid)
    assert stats.fallbacks == 0 and sum(stats.staleness_histogram.values()) == STEPS
    assert stats.staleness_histogram.get(0) == 1  # step 0 only


def test_adaptation_with_the_real_worker_sizes_every_job_within_the_batch():
    # Timing decides the sizes here (no threshold is tested): the wiring with a real worker
    # (ready() before collect, the shared-memory copy-out) must run, keep b_p in [1, batch] and
    # report a trajectory that starts at the given b_p.
    from asam_tune.runtime.adaptation import AdaptationSettings

    settings = AdaptationSettings(window=4, late_fraction=0.25, cooldown=1)
    data = batches((1, 6, 6), steps=2 * STEPS)
    model = bn_convnet()
    with _worker_sam(model, adapt=settings) as sam:
        pid = sam.worker_pid
        sizes = []
        for x, y in sam.lookahead(data):
            assert torch.isfinite(sam.step(x, y))
            sizes.append(sam.perturbation_batch_size)
        stats = sam.stats()
    assert _gone(pid)
    assert stats.fallbacks == 0 and stats.steps == 2 * STEPS
    assert stats.perturbation_batch_size_trajectory[0] == (0, BP)
    assert all(1 <= size <= len(data[0][0]) for size in sizes)
    assert [b for _, b in stats.perturbation_batch_size_trajectory][-1] == sizes[-1]


# ----------------------------------------------------------------------------- resume in a fresh process

RESUME_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, sys.argv[1])
    from asam_tune.runtime import AsyncSAM
    from tests.unit.test_async_sam import RHO, batches, bn_convnet, sgd

    torch.set_num_threads(1)  # the same kernels' reduction order in every process
    root, part, steps, folder = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    data = batches((1, 6, 6), steps=2 * steps)

    def run(sam, batches_, limit):
        for i, (x, y) in enumerate(sam.lookahead(batches_)):
            sam.step(x, y)
            if i == limit - 1:
                break

    def new_sam(model, staleness):
        return AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO, staleness=staleness,
                        perturbation_batch_size=4)

    for staleness in (0, 1):
        prefix = f"{folder}/s{staleness}"
        if part == "first":
            model = bn_convnet()
            with new_sam(model, staleness) as sam:
                run(sam, data, 2 * steps)
            torch.save(model.state_dict(), prefix + "-straight.pt")
            model = bn_convnet()
            with new_sam(model, staleness) as sam:
                run(sam, data, steps)  # lookahead has peeked batch N: e_N is pending
                torch.save({"model": model.state_dict(), "sam": sam.state_dict()}, prefix + "-checkpoint.pt")
        else:
            checkpoint = torch.load(prefix + "-checkpoint.pt", weights_only=True)
            model = bn_convnet()
            model.load_state_dict(checkpoint["model"])
            with new_sam(model, staleness) as sam:
                sam.load_state_dict(checkpoint["sam"])
                run(sam, data[steps:], steps)
            torch.save(model.state_dict(), prefix + "-resumed.pt")
""")


@pytest.mark.slow
def test_resume_in_a_fresh_process_equals_the_straight_run(tmp_path):
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for part in ("first", "second"):  # the second process knows only the checkpoint files
        subprocess.run([sys.executable, str(script), root, part, "5", str(tmp_path)],
                       check=True, timeout=100, cwd=root)
    for staleness, tolerance in ((0, 0.0), (1, 1e-12)):
        expected = torch.load(tmp_path / f"s{staleness}-straight.pt", weights_only=True)
        resumed = torch.load(tmp_path / f"s{staleness}-resumed.pt", weights_only=True)
        assert expected.keys() == resumed.keys()
        if staleness == 0:  # bit for bit
            assert all(torch.equal(expected[k], resumed[k]) for k in expected)
        diff = max((expected[k].double() - resumed[k].double()).abs().max().item() for k in expected)
        assert diff <= tolerance, (staleness, diff)
