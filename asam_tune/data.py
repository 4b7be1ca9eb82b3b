"""MNIST-1D, generated locally, with optional label noise on the training set.

``mnist1d.data.make_dataset`` builds the data in memory (no download, no pickle in the working
directory, unlike ``get_dataset``). It seeds numpy's and Python's global generators, so the
call is wrapped to leave both as they were. ``mnist1d`` pulls in matplotlib and scipy: it is
imported on first use, not when this module is.
"""
from __future__ import annotations

import random
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from asam_tune.errors import UserInputError

NUM_CLASSES = 10
SEQUENCE_LENGTH = 40
# The seed mnist1d's own get_dataset_args() uses: the published MNIST-1D.
DEFAULT_SEED = 42


class MNIST1D(NamedTuple):
    """Inputs are (N, 1, 40) float32 (the ``mnist1d-cnn`` workload's input); labels int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@lru_cache(maxsize=4)
def _generate(seed: int, num_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    args.num_samples = num_samples
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = (data["x"], data["y"], data["x_test"], data["y_test"])
    for a in arrays:
        a.setflags(write=False)  # cached: nobody may change them in place
    return arrays


def flip_labels(y: torch.Tensor, fraction: float, *, num_classes: int = NUM_CLASSES,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Give ``round(fraction * len(y))`` labels, chosen at random, a different random class.

    Returns the new labels and the indices that were flipped; ``y`` is not modified.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise UserInputError(f"label noise must be a fraction in [0, 1], got {fraction!r}")
    if num_classes < 2:
        raise UserInputError(f"label noise needs at least 2 classes, got {num_classes!r}")
    generator = torch.Generator().manual_seed(seed)
    count = round(fraction * len(y))
    flipped = torch.randperm(len(y), generator=generator)[:count]
    # An offset in 1..C-1 modulo C is uniform over the other classes and never the same one.
    offset = torch.randint(1, num_classes, (count,), generator=generator)
    noisy = y.clone()
    noisy[flipped] = (y[flipped] + offset) % num_classes
    return noisy, flipped.sort().values


def mnist1d_dataset(*, seed: int = DEFAULT_SEED, label_noise: float = 0.0, noise_seed: int = 0,
                    num_samples: int = 5000) -> MNIST1D:
    """MNIST-1D (4000 train / 1000 test by default) as tensors; fresh tensors on every call.

    ``label_noise`` is the fraction of *training* labels replaced by a different class, chosen
    with ``noise_seed``; test labels stay clean. Generation (~1 s) is cached per process.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2 * NUM_CLASSES:
        raise UserInputError(f"num_samples must be an integer >= {2 * NUM_CLASSES}, got {num_samples!r}")
    x, y, x_test, y_test = _generate(int(seed), num_samples)
    y_train = torch.tensor(y, dtype=torch.int64)
    if label_noise:
        y_train, _ = flip_labels(y_train, label_noise, seed=noise_seed)
    return MNIST1D(
        x_train=torch.tensor(x, dtype=torch.float32).unsqueeze(1),
        y_train=y_train,
        x_test=torch.tensor(x_test, dtype=torch.float32).unsqueeze(1),
        y_test=torch.tensor(y_test, dtype=torch.int64),
    )


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool,
            generator: torch.Generator | None = None, drop_last: bool = True) -> DataLoader:
    """A re-iterable loader over in-memory tensors (one pass per ``for``), in the main process.

    Pass a seeded ``generator`` to make the shuffling order reproducible.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserInputError(f"batch size must be a positive integer, got {batch_size!r}")
    if len(x) != len(y):
        raise UserInputError(f"inputs and labels differ in length: {len(x)} vs {len(y)}")
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle,
                      generator=generator, drop_last=drop_last)


__all__ = ["MNIST1D", "NUM_CLASSES", "SEQUENCE_LENGTH", "DEFAULT_SEED", "mnist1d_dataset",
           "flip_labels", "batches"]
