"""AsyncSAM with a real CPU worker where real use goes wrong: dropout, resume, pickling, start, /dev/shm.

- Two seeded runs with dropout give identical weights, and a resume is bit-exact, through the
  CPU worker (the ascent's dropout follows the job's seed, kept in the state).
- A lambda loss and a model class from the driving script reach the worker (by value).
- A worker that cannot start (an unpicklable model, a start past ``worker_start_timeout_s``,
  too little /dev/shm, a script without a ``__main__`` guard) falls back with one warning that
  names the cause, or raises it with ``on_worker_failure="raise"``.
"""
from __future__ import annotations

import io
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asam_tune.errors import WorkerError
from asam_tune.runtime import AsyncSAM

pytestmark = [pytest.mark.timeout(180), pytest.mark.process]

RHO, LR = 0.1, 0.05
ROOT = Path(__file__).resolve().parents[2]


class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


class Unpicklable(DropoutNet):
    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()  # neither pickle nor cloudpickle can send a lock


def make(cls=DropoutNet) -> nn.Module:
    torch.manual_seed(0)
    return cls().double()


def batches(n: int = 8):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
            for _ in range(n)]


def train(model, data, sam_options, *, state=None, steps=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    with AsyncSAM(model, optimizer, F.cross_entropy, RHO, perturbation_device="cpu", perturbation_batch_size=4,
                  on_worker_failure="raise", **sam_options) as sam:
        if state is not None:
            sam.load_state_dict(state)
        for i, (x, y) in enumerate(sam.lookahead(data)):
            if steps is not None and i == steps:
                break
            sam.step(x, y)
        saved = sam.state_dict()
        stats = sam.stats()
    return saved, stats


def weights(model):
    return [t.detach().clone() for t in model.state_dict().values()]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def seeded_run() -> tuple[list, object]:
    """One straight run with dropout through the CPU worker: its weights and statistics."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(3)
        model = make()
        _, stats = train(model, batches(), {"seed": 11})
    finally:
        torch.set_num_threads(before)
    return weights(model), stats


@pytest.fixture(scope="module")
def straight_run():
    """The seeded run both tests below compare against (one worker start fewer)."""
    return seeded_run()


def test_two_seeded_runs_with_dropout_through_the_cpu_worker_are_identical(straight_run):
    runs = [straight_run, seeded_run()]
    assert all(stats.staleness_histogram == {0: 1, 1: 7} for _, stats in runs)
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))


def test_a_resume_with_dropout_through_the_cpu_worker_is_bit_exact(straight_run):
    data = batches()
    straight, _ = straight_run

    torch.manual_seed(3)
    first = make()
    buffer = io.BytesIO()
    # Stop after 4 steps; the checkpoint holds the model, AsyncSAM (its seed and the pending
    # perturbation for step 4) and the caller's random state (the descent's dropout).
    state, _ = train(first, data, {"seed": 11}, steps=4)
    torch.save({"model": first.state_dict(), "sam": state, "rng": torch.get_rng_state()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = make()
    resumed.load_state_dict(checkpoint["model"])
    torch.set_rng_state(checkpoint["rng"])
    # A different seed argument: the checkpoint's seed wins, as everything else in it does.
    optimizer = torch.optim.SGD(resumed.parameters(), lr=LR, momentum=0.9)
    with AsyncSAM(resumed, optimizer, F.cross_entropy, RHO, perturbation_device="cpu", perturbation_batch_size=4,
                  on_worker_failure="raise", seed=999) as sam:
        sam.load_state_dict(checkpoint["sam"])
        for x, y in sam.lookahead(data[4:]):
            sam.step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), straight))


def test_a_lambda_loss_reaches_the_worker():
    model = make()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    with AsyncSAM(model, optimizer, lambda out, y: F.cross_entropy(out, y), RHO, perturbation_device="cpu",
                  on_worker_failure="raise") as sam:
        for x, y in sam.lookahead(batches(3)):
            sam.step(x, y)
        assert sam.stats().staleness_histogram == {0: 1, 1: 2}


def test_an_unpicklable_model_falls_back_with_one_warning_or_raises():
    model = make(Unpicklable)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    with pytest.raises(WorkerError, match="cannot send the model"):
        AsyncSAM(model, optimizer, F.cross_entropy, RHO, perturbation_device="cpu", on_worker_failure="raise")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with AsyncSAM(model, optimizer, F.cross_entropy, RHO, perturbation_device="cpu") as sam:
            for x, y in sam.lookahead(batches(3)):
                sam.step(x, y)
            stats = sam.stats()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "cannot send the model" in messages[0] and "synchronous SAM" in messages[0]
    assert stats.fallbacks == 1 and stats.staleness_histogram == {0: 3}


def test_the_start_timeout_is_the_callers_and_a_late_start_falls_back():
    model = make()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    with pytest.warns(RuntimeWarning, match=r"did not start within 0.001 s \(worker_start_timeout_s"):
        with AsyncSAM(model, optimizer, F.cross_entropy, RHO, perturbation_device="cpu",
                      worker_start_timeout_s=0.001) as sam:
            sam.step(*batches(1)[0])
    assert sam.stats().fallbacks == 1


SCRIPT_WITHOUT_GUARD = textwrap.dedent("""
    import warnings, torch, torch.nn.functional as F
    from asam_tune.runtime import AsyncSAM
    warnings.simplefilter("always")
    model = torch.nn.Linear(4, 2)
    sam = AsyncSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, 0.05,
                   perturbation_device="cpu", worker_start_timeout_s=60)
    sam.step(torch.randn(4, 4), torch.randint(0, 2, (4,)))
    print("fallbacks", sam.stats().fallbacks)
    sam.close()
""")


def test_a_script_without_a_main_guard_is_told_what_to_do(tmp_path):
    script = tmp_path / "train_no_guard.py"
    script.write_text(SCRIPT_WITHOUT_GUARD)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert 'if __name__ == "__main__":' in done.stderr
    assert "train_no_guard.py" in done.stderr
    assert done.stdout.strip().splitlines()[-1] == "fallbacks 1"


SHM_SCRIPT = textwrap.dedent("""
    import sys, warnings, torch, torch.nn.functional as F
    from asam_tune.errors import WorkerError
    from asam_tune.runtime import AsyncSAM

    def main():
        model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 4))  # ~2.1 MB of weights
        data = [(torch.randn(8, 256), torch.randint(0, 4, (8,))) for _ in range(3)]
        try:
            AsyncSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, 0.05,
                     perturbation_device="cpu", on_worker_failure="raise")
        except WorkerError as exc:
            print("RAISED", exc)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with AsyncSAM(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, 0.05,
                          perturbation_device="cpu") as sam:
                for x, y in sam.lookahead(data):
                    sam.step(x, y)
                print("FALLBACKS", sam.stats().fallbacks, sam.stats().staleness_histogram)
        for w in caught:
            print("WARNING", w.message)

    if __name__ == "__main__":
        main()
""")


def _private_small_shm_works() -> bool:
    try:
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               "mount -t tmpfs -o size=1m tmpfs /dev/shm"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def test_too_little_dev_shm_falls_back_and_names_the_fix(tmp_path):
    if not _private_small_shm_works():
        pytest.skip("needs root in a private mount namespace (unshare --mount) to shrink /dev/shm")
    script = tmp_path / "shm_small.py"
    script.write_text(SHM_SCRIPT)
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           f"mount -t tmpfs -o size=1m tmpfs /dev/shm && exec {sys.executable} {script}"],
                          capture_output=True, text=True, timeout=150, cwd=ROOT)
    out = done.stdout
    assert done.returncode == 0, done.stderr[-2000:]
    assert "RAISED not enough shared memory for the perturbation worker" in out
    assert "--shm-size" in out and "MB in /dev/shm" in out
    assert "FALLBACKS 1 {0: 3}" in out
    warnings_seen = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert len(warnings_seen) == 1 and "shared memory" in warnings_seen[0]


def test_an_uncopyable_weight_norm_model_falls_back_and_trains_in_process():
    """Old-style weight_norm holds a computed weight after one forward: deepcopy and pickle fail."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the old weight_norm
        model = nn.Sequential(nn.utils.weight_norm(nn.Linear(5, 8)), nn.ReLU(), nn.Linear(8, 3)).double()
    model(torch.randn(2, 5, dtype=torch.float64))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="cannot be copied"):
        with AsyncSAM(model, torch.optim.SGD(model.parameters(), lr=LR), F.cross_entropy, RHO,
                      perturbation_device="cpu") as sam:
            for x, y in sam.lookahead(batches(3)):
                sam.step(x, y)
    assert sam.stats().fallbacks == 1 and sam.stats().staleness_histogram == {0: 3}
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before))
