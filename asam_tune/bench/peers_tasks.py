"""The two workloads of the peers benchmark: data split three ways, model, base optimizer, schedule.

Every method of ``python -m asam_tune.bench.peers`` trains on the same ``Task``: the same
training samples (with the same flipped labels), the same model factory and seed, the same base
optimizer and cosine schedule. The validation split is carved from the training portion before
any label is flipped and keeps its clean labels: it stands for a small trusted held-out set,
and it is the only split any hyper-parameter is chosen on. The test split is never looked at
to choose anything.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from asam_tune.errors import UserInputError

PROFILES = Path(__file__).resolve().parents[2] / "profiles"


@dataclass(frozen=True)
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor  # noisy labels
    x_val: torch.Tensor
    y_val: torch.Tensor  # clean labels
    x_test: torch.Tensor
    y_test: torch.Tensor  # clean labels
    flipped: torch.Tensor  # indices into the training portion whose label was flipped


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    build: Callable[[], nn.Module]
    optimizer: type[torch.optim.Optimizer]
    optimizer_kwargs: dict
    batch_size: int
    epochs: int  # the default length of a run
    label_noise: float
    data: Callable[[], Split] = field(repr=False)
    profile: str | None = None  # a shipped profile of this workload (profiles/), for the plan's predictions
    workload: str = ""  # the name in asam_tune.workloads (what `asam-tune profile` takes)
    ladder: str = "sgd"  # which rho ladder of peers_select suits the base optimizer
    rho_guess: float = 0.3  # where the walk for SAM's rho starts
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return self.optimizer(params, **self.optimizer_kwargs)


def carve(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, *,
          validation: int, label_noise: float, num_classes: int, noise_seed: int = 0) -> Split:
    """Take the last ``validation`` training samples as the validation split, then flip labels in the rest."""
    from asam_tune.data import flip_labels

    if not 0 < validation < len(x):
        raise UserInputError(f"validation size must be in (0, {len(x)}), got {validation!r}")
    x_train, y_train = x[:-validation], y[:-validation]
    flipped = torch.empty(0, dtype=torch.int64)
    if label_noise:
        y_train, flipped = flip_labels(y_train, label_noise, num_classes=num_classes, seed=noise_seed)
    return Split(x_train.clone(), y_train.clone(), x[-validation:].clone(), y[-validation:].clone(),
                 x_test.clone(), y_test.clone(), flipped)


@lru_cache(maxsize=2)
def _mnist1d_split() -> Split:
    from asam_tune.data import NUM_CLASSES, mnist1d_dataset

    clean = mnist1d_dataset(label_noise=0.0)
    return carve(clean.x_train, clean.y_train, clean.x_test, clean.y_test, validation=800,
                 label_noise=0.3, num_classes=NUM_CLASSES)


@lru_cache(maxsize=2)
def _sequence_split() -> Split:
    from asam_tune import seqtask

    clean = seqtask.sequence_dataset(num_train=3500, num_test=1000)
    return carve(clean.x_train, clean.y_train, clean.x_test, clean.y_test, validation=500,
                 label_noise=0.3, num_classes=seqtask.NUM_CLASSES)


def _mnist1d_cnn() -> nn.Module:
    from asam_tune.workloads import MNIST1DCNN

    return MNIST1DCNN()


def _sequence_transformer() -> nn.Module:
    from asam_tune.seqtask import sequence_transformer

    return sequence_transformer()


TASKS: dict[str, Task] = {
    "mnist1d-cnn": Task(
        name="mnist1d-cnn",
        description="MNIST-1D (3200 train, 30% of training labels flipped; 800 validation and 1000 test, "
                    "clean), the project's 1-D CNN, SGD lr 0.05 momentum 0.9 wd 5e-4, cosine, B=100",
        build=_mnist1d_cnn, optimizer=torch.optim.SGD,
        optimizer_kwargs={"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        batch_size=100, epochs=60, label_noise=0.3, data=_mnist1d_split,
        profile="cpu-2core-mnist1d-cnn.json", workload="mnist1d-cnn", ladder="sgd", rho_guess=0.45),
    "seq-transformer": Task(
        name="seq-transformer",
        description="marker-sum sequences (asam_tune.seqtask: 3000 train, 30% of training labels flipped; "
                    "500 validation and 1000 test, clean), a 2-layer transformer (d=64, 4 heads), "
                    "AdamW lr 1e-3 wd 0.05, cosine, B=100",
        build=_sequence_transformer, optimizer=torch.optim.AdamW,
        optimizer_kwargs={"lr": 1e-3, "weight_decay": 0.05},
        batch_size=100, epochs=40, label_noise=0.3, data=_sequence_split,
        profile="cpu-2core-seq-transformer.json", workload="asam_tune.seqtask:workload_factory",
        ladder="adamw", rho_guess=0.1),
}


def load_task(name: str) -> Task:
    if name not in TASKS:
        raise UserInputError(f"unknown workload {name!r} for the peers benchmark (choose from {', '.join(TASKS)})")
    return TASKS[name]


__all__ = ["Split", "Task", "TASKS", "load_task", "carve", "PROFILES"]
