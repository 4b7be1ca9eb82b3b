"""Train the MNIST-1D CNN with SGD, SAM or asynchronous SAM and report accuracy and time.

Used by ``asam-tune train`` (the README's main job) and the accuracy benchmark. SAM is
``AsyncSAM(staleness=0)`` in-process (synchronous SAM through the same code path);
asynchronous SAM uses the plan's worker; "asam-previous" is the ablation whose ascent batch is
the previous one (``next_batch`` = the current batch), which DESIGN.md measured to lose most
of SAM's gain.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from asam_tune.data import batches, mnist1d_dataset
from asam_tune.errors import UserInputError
from asam_tune.records.plan import Plan
from asam_tune.runtime import AsyncSAM
from asam_tune.workloads import load_workload

METHODS = ("sgd", "sam", "asam", "asam-previous")


@dataclass(frozen=True)
class TrainConfig:
    method: str
    epochs: int = 3
    batch_size: int = 100
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    rho: float = 0.05
    seed: int = 0
    label_noise: float = 0.0  # fraction of training labels flipped (fixed noise seed)

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserInputError(f"Invalid method: {self.method!r} (expected one of {', '.join(METHODS)})")


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(dim=1) == y).sum().item()
    model.train()
    return correct / len(y)


def train_mnist1d(config: TrainConfig, *, plan: Plan | None = None,
                  progress: Callable[[int, int], None] = lambda done, total: None,
                  device: str | torch.device = "cpu", sam_options: dict | None = None) -> dict:
    """Train from scratch; returns accuracies, wall time, median step time and worker stats.

    ``device`` is the main device (the data is moved there batch by batch); ``sam_options`` go
    to asynchronous SAM's ``AsyncSAM`` (e.g. ``perturbation_device``, ``ascent_dtype``).
    """
    device = torch.device(device)
    sam_options = dict(sam_options or {})
    workload = load_workload("mnist1d-cnn")
    data = mnist1d_dataset(label_noise=config.label_noise)
    torch.manual_seed(config.seed)
    model = workload.build().to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    loader = batches(data.x_train, data.y_train, config.batch_size, shuffle=True, generator=generator)
    total = config.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    loss_fn = workload.loss_fn

    sam = None
    if config.method == "sam":
        sam = AsyncSAM(model, optimizer, loss_fn, config.rho, staleness=0)
    elif config.method.startswith("asam"):
        if plan is not None:
            # adapt=False: every seed trains with the plan's b_p, so runs compare like for like.
            sam = AsyncSAM(model, optimizer, loss_fn, config.rho, plan=plan, allow_other_machine=True, adapt=False,
                           **sam_options)
        else:  # no plan: the worker is the one sam_options name (in-process by default), one step stale
            sam = AsyncSAM(model, optimizer, loss_fn, config.rho, staleness=1, **sam_options)

    # One stream over all epochs, so the look-ahead crosses epoch boundaries too.
    every_batch = ((x.to(device), y.to(device)) for _ in range(config.epochs) for x, y in loader)
    stream = sam.lookahead(every_batch) if sam is not None and config.method != "asam-previous" else every_batch
    step_times: list[float] = []
    started = time.perf_counter()
    try:
        for x, y in stream:
            tick = time.perf_counter()
            if sam is None:
                optimizer.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                optimizer.step()
            elif config.method == "asam-previous":
                # The ablation: the worker's ascent batch is this step's, applied next step.
                optimizer.zero_grad(set_to_none=True)
                with sam.perturbed(x, y, next_batch=(x, y)):
                    loss_fn(model(x), y).backward()
                optimizer.step()
                sam.finish_step()
            else:
                sam.step(x, y)
            scheduler.step()
            step_times.append(time.perf_counter() - tick)
            progress(len(step_times), total)
        elapsed = time.perf_counter() - started
        worker = asdict(sam.stats()) if sam is not None else None
    finally:
        if sam is not None:
            sam.close()
    return {
        **asdict(config),
        "test_accuracy": _accuracy(model, data.x_test.to(device), data.y_test.to(device)),
        "train_accuracy": _accuracy(model, data.x_train.to(device), data.y_train.to(device)),
        "train_time_s": elapsed,
        "step_time_median_s": statistics.median(step_times),
        "steps": len(step_times),
        "perturbation_batch_size": (sam.perturbation_batch_size or config.batch_size) if sam is not None else None,
        "worker": worker,
    }
