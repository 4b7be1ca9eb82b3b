"""The peers benchmark's steppers on the current runtime: every method trains, rho is applied as given."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from asam_tune.bench.peers_methods import parse_method
from asam_tune.bench.peers_steppers import make_stepper
from asam_tune.bench.peers_tasks import Task
from asam_tune.errors import UserInputError

B = 16


def _tiny_task() -> Task:
    return Task(name="tiny", description="a 2-layer MLP on random data", build=lambda: nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), optimizer=torch.optim.SGD,
        optimizer_kwargs={"lr": 0.1, "momentum": 0.9}, batch_size=B, epochs=1, label_noise=0.0,
        data=lambda: None)


def _batches(count: int):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(B, 8, generator=g), torch.randint(0, 4, (B,), generator=g)) for _ in range(count)]


def _train(name: str, rho: float, steps: int = 8):
    task = _tiny_task()
    torch.manual_seed(0)
    model = task.build()
    method = parse_method(name)
    stepper = make_stepper(task, method, model, rho if method.has_rho else 0.0, seed=0, total_steps=steps)
    data = _batches(steps + 1)
    try:
        for i in range(steps):
            stepper.step(*data[i], data[i + 1] if i + 1 < steps else None)
        stats = stepper.stats()
    finally:
        stepper.close()
    return model, stepper, stats


@pytest.mark.parametrize("name", ["sgd", "sam", "asam-1/4", "sync-1/4", "nonblocking-1-beta1/4",
                                  "split-1/8+1/4", "rst-0.5", "mesa", "po-sam", "looksam-k2", "looksam-k2-a0.3"])
def test_every_method_trains_and_moves_the_weights(name):
    if name.startswith(("po-sam", "looksam")):
        pytest.importorskip("pytorch_optimizer")
    torch.manual_seed(0)  # the same initial weights as _train's
    start = [p.detach().clone() for p in _tiny_task().build().parameters()]
    model, _, _ = _train(name, 0.05)
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, start))


def test_asynchronous_sam_applies_the_rho_it_is_given_not_a_rule():
    # The peers' rho is the rho at the method's own b_p: the runtime's default rule must not rescale it.
    _, stepper, stats = _train("asam-1/8", 0.05)
    assert stats["rho_applied"] == pytest.approx(0.05)
    assert stepper.sam.rho_at(2, B) == pytest.approx(0.05)


def test_the_slow_worker_delivers_each_perturbation_the_given_number_of_steps_late():
    # b_p = B at beta 1/4: a job takes 4 main steps and its result serves until the next one
    # arrives, so once the first job is back every applied perturbation is 4 to 7 steps stale.
    _, _, stats = _train("nonblocking-1-beta1/4", 0.05, steps=20)
    applied = {int(k): v for k, v in stats["staleness_histogram"].items()}
    assert sum(v for k, v in applied.items() if k < 4) <= 4
    assert sum(v for k, v in applied.items() if 4 <= k <= 7) >= 12 and max(applied) <= 7


def test_looksam_alpha_parses_and_is_checked():
    assert parse_method("looksam-k5-a0.3").alpha == 0.3 and parse_method("looksam-k5").alpha is None
    with pytest.raises(UserInputError, match="looksam-k5-a1.5"):
        parse_method("looksam-k5-a1.5")


def test_rho_changes_the_trajectory():
    # A different rho gives a different trajectory: the stepper does use it.
    a, _, _ = _train("asam-1/2", 0.01)
    b, _, _ = _train("asam-1/2", 0.5)
    assert any(not torch.allclose(x, y) for x, y in zip(a.parameters(), b.parameters()))

