"""One training run of one method, and the store that keeps every run the peers benchmark made.

A run trains from the task's seed-fixed initial weights on the noisy training split, in one
stream over all epochs (so the look-ahead crosses epoch boundaries), with a cosine schedule
over all steps. After every epoch it records validation and test accuracy; the time spent
evaluating is not counted in the training time. The step times are what this process measured:
for the asynchronous methods run in-process they include the ascent (serial), which a worker
process would take off the main step's path (``peers_timing`` measures that separately).

``RunStore`` appends each finished run to a JSON-lines file, keyed by everything that
determines it, so an interrupted sweep resumes and the rho study and the peers tables share
runs; the file is the raw record of every sweep.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from asam_tune.bench.peers_methods import Method
from asam_tune.bench.peers_steppers import make_stepper
from asam_tune.bench.peers_tasks import Task
from asam_tune.data import batches

# Bump when a change alters what a run computes: stored runs of another version are not reused.
RUN_FORMAT = 1


def run_key(task: Task, method: Method, rho: float, seed: int, epochs: int) -> str:
    return f"v{RUN_FORMAT}|{task.name}|{method.name}|rho={float(rho):.6g}|seed={seed}|epochs={epochs}"


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1000) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), chunk):
            correct += (model(x[start:start + chunk]).argmax(dim=1) == y[start:start + chunk]).sum().item()
    model.train(was_training)
    return correct / len(y)


def _with_next(stream: Iterator) -> Iterator[tuple]:
    current = next(stream, None)
    while current is not None:
        following = next(stream, None)
        yield current, following
        current = following


def train_run(task: Task, method: Method, rho: float, seed: int, epochs: int, *,
              progress: Callable[[str], None] = lambda line: None) -> dict:
    """Train once; returns accuracies (per epoch too), timings and the method's own statistics."""
    split = task.data()
    B = task.batch_size
    steps_per_epoch = len(split.x_train) // B
    total = epochs * steps_per_epoch
    torch.manual_seed(seed)
    model = task.build().train()
    stepper = make_stepper(task, method, model, rho if method.has_rho else 0.0, seed=seed, total_steps=total)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(stepper.scheduled, T_max=total)
    loader = batches(split.x_train, split.y_train, B, shuffle=True,
                     generator=torch.Generator().manual_seed(seed))
    stream = (batch for _ in range(epochs) for batch in loader)
    step_times: list[float] = []
    epoch_times: list[float] = []
    val_curve: list[float] = []
    test_curve: list[float] = []
    try:
        for index, ((x, y), following) in enumerate(_with_next(stream)):
            tick = time.perf_counter()
            stepper.step(x, y, following)
            scheduler.step()
            step_times.append(time.perf_counter() - tick)
            if (index + 1) % steps_per_epoch == 0:
                epoch_times.append(sum(step_times[-steps_per_epoch:]))
                val_curve.append(_accuracy(model, split.x_val, split.y_val))
                test_curve.append(_accuracy(model, split.x_test, split.y_test))
        stats = stepper.stats()
    finally:
        stepper.close()
    finite = all(math.isfinite(p.detach().sum().item()) for p in model.parameters())
    flipped = split.flipped
    memorized = (_accuracy(model, split.x_train[flipped], split.y_train[flipped]) if len(flipped) else None)
    result = {
        "task": task.name, "method": method.name, "rho": float(rho) if method.has_rho else None,
        "seed": seed, "epochs": epochs, "batch_size": B,
        "perturbation_batch_size": method.perturbation_batch_size(B),
        "val_accuracy": val_curve[-1], "test_accuracy": test_curve[-1],
        "train_accuracy": _accuracy(model, split.x_train, split.y_train),
        "memorized_flipped": memorized, "finite_weights": finite,
        "val_curve": val_curve, "test_curve": test_curve,
        "epoch_times_s": epoch_times, "train_time_s": sum(step_times),
        "step_time_median_s": statistics.median(step_times), "steps": len(step_times),
        "stats": stats,
    }
    progress(f"{task.name} {method.name:24s} rho={result['rho']} seed={seed}: val {100 * result['val_accuracy']:.1f} "
             f"test {100 * result['test_accuracy']:.1f} ({result['train_time_s']:.0f} s)")
    return result


class RunStore:
    """Every finished run, one JSON object per line; ``get`` returns a stored run by its key."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = None if path is None else Path(path)
        self._runs: dict[str, dict] = {}
        if self.path is not None and self.path.exists():
            for number, line in enumerate(self.path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    # A line cut short by an interrupted write: the run is simply made again.
                    continue
                self._runs[entry["key"]] = entry["run"]

    def get(self, key: str) -> dict | None:
        return self._runs.get(key)

    def add(self, key: str, run: dict) -> None:
        self._runs[key] = run
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps({"key": key, "run": run}, allow_nan=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def __len__(self) -> int:
        return len(self._runs)


def get_or_train(store: RunStore, task: Task, method: Method, rho: float, seed: int, epochs: int, *,
                 progress: Callable[[str], None] = lambda line: None) -> dict:
    key = run_key(task, method, rho if method.has_rho else 0.0, seed, epochs)
    run = store.get(key)
    if run is None:
        run = train_run(task, method, rho, seed, epochs, progress=progress)
        store.add(key, run)
    return run


__all__ = ["train_run", "RunStore", "get_or_train", "run_key", "RUN_FORMAT"]
