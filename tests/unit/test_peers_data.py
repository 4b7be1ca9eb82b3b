"""The peers benchmark's data: the marked-digit sequences and the train / validation / test split."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asam_tune import seqtask
from asam_tune.bench.peers_tasks import TASKS, carve
from asam_tune.errors import UserInputError


def test_generation_is_deterministic_per_seed_and_moves_no_global_state():
    torch.manual_seed(123)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    a = seqtask.generate(300, seed=5)
    b = seqtask.generate(300, seed=5)
    c = seqtask.generate(300, seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]


def test_every_sequence_has_two_marked_digits_and_the_label_is_their_sum_mod_10():
    x, y = seqtask.generate(500, seed=1)
    assert x.shape == (500, seqtask.DEFAULT_LENGTH) and x.dtype == torch.int64
    marked = x >= seqtask.MARKED_OFFSET
    assert torch.all(marked.sum(dim=1) == 2)
    assert int(x.max()) < seqtask.VOCABULARY and int(x.min()) >= 0
    for row, label in zip(x[:50], y[:50]):
        digits = [int(t) - seqtask.MARKED_OFFSET for t in row if t >= seqtask.MARKED_OFFSET]
        assert label == sum(digits) % 10
    # Every class occurs, none dominates: the task is not solvable by a prior.
    counts = torch.bincount(y, minlength=10).float() / len(y)
    assert counts.min() > 0.05 and counts.max() < 0.16


def test_label_noise_touches_training_labels_only():
    clean = seqtask.sequence_dataset(num_train=400, num_test=100)
    noisy = seqtask.sequence_dataset(num_train=400, num_test=100, label_noise=0.3)
    assert torch.equal(clean.x_train, noisy.x_train) and torch.equal(clean.y_test, noisy.y_test)
    assert (clean.y_train != noisy.y_train).sum() == 120
    assert torch.equal(seqtask.label_of(noisy.x_test), noisy.y_test)


def test_bad_sizes_are_one_line_errors():
    with pytest.raises(UserInputError, match="num_samples"):
        seqtask.generate(0)
    with pytest.raises(UserInputError, match="length"):
        seqtask.generate(10, length=1)
    with pytest.raises(UserInputError, match="num_test"):
        seqtask.sequence_dataset(num_test=-1)


def test_the_transformer_learns_the_rule_from_clean_labels():
    """The same rule on 6-digit sequences, 60 steps of a narrower model (a few seconds): far above
    chance on held-out sequences, so the labels are learnable, not noise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only loses to thread hand-offs
    try:
        accuracy = _train_briefly()
    finally:
        torch.set_num_threads(threads)
    assert accuracy > 0.5  # chance is 0.1


def _train_briefly() -> float:
    torch.manual_seed(0)
    data = seqtask.sequence_dataset(num_train=1500, num_test=500, length=6)
    model = seqtask.SequenceTransformer(dim=32, length=6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        order = torch.randperm(len(data.x_train), generator=generator)
        for start in range(0, len(order), 100):
            batch = order[start:start + 100]
            optimizer.zero_grad()
            F.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        return (model(data.x_test).argmax(1) == data.y_test).float().mean().item()


@pytest.mark.parametrize("name", sorted(TASKS))
def test_validation_never_overlaps_test_or_training_and_keeps_clean_labels(name):
    split = TASKS[name].data()
    flat = lambda t: {row.numpy().tobytes() for row in t.reshape(len(t), -1)}  # noqa: E731
    val, test, train = flat(split.x_val), flat(split.x_test), flat(split.x_train)
    assert not val & test
    assert not val & train
    assert len(split.x_val) + len(split.x_train) > len(split.x_val)
    # Labels flipped in training only: the validation labels are the generator's clean ones.
    assert len(split.flipped) == round(TASKS[name].label_noise * len(split.y_train))
    if name == "seq-transformer":
        assert torch.equal(seqtask.label_of(split.x_val), split.y_val)
        assert torch.equal(seqtask.label_of(split.x_test), split.y_test)
        wrong = seqtask.label_of(split.x_train) != split.y_train
        assert torch.equal(wrong.nonzero().flatten(), split.flipped)


def test_carve_takes_validation_before_flipping_and_checks_its_size():
    x = torch.arange(100).float().unsqueeze(1)
    y = torch.arange(100) % 10
    split = carve(x, y, x[:5], y[:5], validation=20, label_noise=0.5, num_classes=10)
    assert torch.equal(split.x_val, x[80:]) and torch.equal(split.y_val, y[80:])
    assert len(split.x_train) == 80 and (split.y_train != y[:80]).sum() == 40
    with pytest.raises(UserInputError, match="validation size"):
        carve(x, y, x, y, validation=100, label_noise=0.0, num_classes=10)
