"""MNIST-1D generation, label noise and batching."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asam_tune.data import batches, flip_labels, mnist1d_dataset
from asam_tune.errors import UserInputError
from asam_tune.workloads import BUILTINS

# A small dataset generates in ~50 ms; the default one (~1 s) only where it matters.
SMALL = 200


def test_default_dataset_is_the_reference_mnist1d():
    from mnist1d.data import get_dataset_args, make_dataset

    data = mnist1d_dataset()
    reference = make_dataset(get_dataset_args())  # the package's own default: seed 42, 5000
    assert data.x_train.shape == (4000, 1, 40) and data.x_test.shape == (1000, 1, 40)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert torch.equal(data.x_train[:, 0], torch.tensor(reference["x"], dtype=torch.float32))
    assert torch.equal(data.y_train, torch.tensor(reference["y"]))
    assert torch.equal(data.x_test[:, 0], torch.tensor(reference["x_test"], dtype=torch.float32))
    assert torch.equal(data.y_test, torch.tensor(reference["y_test"]))
    assert data.x_train.shape[1:] == BUILTINS["mnist1d-cnn"].input_shape
    assert set(data.y_train.tolist()) == set(range(10))


def test_deterministic_per_seed_and_fresh_tensors():
    a = mnist1d_dataset(seed=3, num_samples=SMALL)
    b = mnist1d_dataset(seed=3, num_samples=SMALL)
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert a.x_train.data_ptr() != b.x_train.data_ptr()
    a.x_train.zero_()
    a.y_train.zero_()
    c = mnist1d_dataset(seed=3, num_samples=SMALL)
    assert torch.equal(c.x_train, b.x_train) and torch.equal(c.y_train, b.y_train)  # cache intact
    other = mnist1d_dataset(seed=4, num_samples=SMALL)
    assert not torch.equal(other.x_train, b.x_train)


def test_generation_leaves_global_generators_and_cwd_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.random.seed(123)
    random.seed(123)
    expected = (np.random.random(), random.random())
    np.random.seed(123)
    random.seed(123)
    mnist1d_dataset(seed=11, num_samples=SMALL)  # a seed no other test uses: not cached
    assert (np.random.random(), random.random()) == expected
    assert list(tmp_path.iterdir()) == []  # no pickle written, nothing downloaded


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.55, 1.0])
def test_label_noise_flips_exactly_the_fraction(fraction):
    clean = mnist1d_dataset(seed=5, num_samples=SMALL)
    noisy = mnist1d_dataset(seed=5, num_samples=SMALL, label_noise=fraction, noise_seed=1)
    n = len(clean.y_train)
    changed = (noisy.y_train != clean.y_train).sum().item()
    assert changed == round(fraction * n)
    assert torch.equal(noisy.y_test, clean.y_test)
    assert torch.equal(noisy.x_train, clean.x_train)
    assert 0 <= noisy.y_train.min() and noisy.y_train.max() < 10


def test_label_noise_is_deterministic_per_noise_seed():
    y = torch.arange(1000) % 10
    first, idx_first = flip_labels(y, 0.3, seed=7)
    again, idx_again = flip_labels(y, 0.3, seed=7)
    other, idx_other = flip_labels(y, 0.3, seed=8)
    assert torch.equal(first, again) and torch.equal(idx_first, idx_again)
    assert not torch.equal(idx_first, idx_other)
    assert torch.equal(y, torch.arange(1000) % 10)  # input untouched
    assert torch.equal(torch.nonzero(first != y).flatten(), idx_first)
    # The new class is drawn over all the other classes, not a fixed shift.
    shifts = ((first[idx_first] - y[idx_first]) % 10).unique().tolist()
    assert shifts == list(range(1, 10))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.3", True])
def test_label_noise_rejects_bad_fractions(bad):
    with pytest.raises(UserInputError, match="label noise"):
        mnist1d_dataset(seed=5, num_samples=SMALL, label_noise=bad)


def test_num_samples_validated():
    with pytest.raises(UserInputError, match="num_samples"):
        mnist1d_dataset(num_samples=5)


def test_batches_cover_the_data_and_shuffle_reproducibly():
    x = torch.arange(10, dtype=torch.float32).unsqueeze(1)
    y = torch.arange(10)
    loader = batches(x, y, 3, shuffle=False, drop_last=False)
    assert [len(b[1]) for b in loader] == [3, 3, 3, 1]
    assert torch.equal(torch.cat([b[1] for b in loader]), y)
    assert [len(b[1]) for b in batches(x, y, 3, shuffle=False)] == [3, 3, 3]  # drop_last default

    def order(seed):
        loader = batches(x, y, 5, shuffle=True, generator=torch.Generator().manual_seed(seed))
        return torch.cat([b[1] for b in loader]).tolist()

    assert order(0) == order(0)
    assert sorted(order(0)) == list(range(10))
    assert any(order(0) != order(s) for s in (1, 2, 3))
    for xb, yb in batches(x, y, 5, shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert torch.equal(xb[:, 0].long(), yb)  # pairs stay together


def test_batches_validate_arguments():
    x, y = torch.zeros(4, 1), torch.zeros(4, dtype=torch.long)
    with pytest.raises(UserInputError, match="0"):
        batches(x, y, 0, shuffle=False)
    with pytest.raises(UserInputError, match="4 vs 3"):
        batches(x, y[:3], 2, shuffle=False)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_cnn_learns_mnist1d():
    data = mnist1d_dataset()
    workload = BUILTINS["mnist1d-cnn"]
    torch.manual_seed(0)
    model = workload.build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = batches(data.x_train, data.y_train, 64, shuffle=True, generator=torch.Generator().manual_seed(0))
    steps = 0
    while steps < 150:
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            steps += 1
            if steps == 150:
                break
    model.eval()
    with torch.no_grad():
        accuracy = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    assert accuracy > 0.6, accuracy  # chance is 0.1; ~0.87 here, ~0.95 after 10 epochs
