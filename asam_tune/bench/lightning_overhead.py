"""Step time of a Lightning Trainer with ``AsyncSAMCallback`` against the same Trainer without it.

    python -m asam_tune.bench.lightning_overhead --output docs/results/lightning-overhead-cifar-like.json

One process, ``--rounds`` runs of each arm in turn on the same data and model (a small BatchNorm
convnet on generated 3x32x32 images, batch 128): ``plain`` (no callback), ``async`` (the
callback at staleness 1 with a CPU worker of one thread, b_p 32) and, for scale, ``sync``
(the same callback at staleness 0, in-process: synchronous SAM, two forward-backward passes
per step). A step's time is the interval between successive ``on_train_batch_start`` calls of a
timing callback placed first: the whole step, data loading and the callback's work included.
The first ``--warmup`` steps of each run are dropped; the median over every timed step of an
arm is reported, with each run's median and the load average before and after it (the
figures mean little on a loaded machine).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

__all__ = ["main", "measure"]


def _parts():
    """The model, data and timing callback (lightning and torch imported only when run)."""
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    class ConvNet(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(32 * 8 * 8, 10))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)

    class StepClock(pl.Callback):
        def __init__(self):
            self.starts: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.starts.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module):
            self.starts.append(time.perf_counter())

    def loader(samples: int, batch_size: int) -> Any:
        generator = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(samples, 3, 32, 32, generator=generator),
                             torch.randint(0, 10, (samples,), generator=generator))
        return DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)

    return pl, ConvNet, StepClock, loader


def measure(steps: int = 60, warmup: int = 10, batch_size: int = 128, perturbation_batch_size: int = 32,
            rho: float = 0.05, rounds: int = 3) -> dict[str, Any]:
    import torch

    from asam_tune.integrations.lightning import AsyncSAMCallback

    pl, ConvNet, StepClock, loader = _parts()
    torch.set_num_threads(1)  # the main process's core; the worker has the other
    arms = {
        "plain": lambda: [],
        "async": lambda: [AsyncSAMCallback(rho, perturbation_device="cpu", staleness=1, threads=1,
                                           perturbation_batch_size=perturbation_batch_size)],
        "sync": lambda: [AsyncSAMCallback(rho, perturbation_batch_size=perturbation_batch_size, staleness=0)],
    }
    result: dict[str, Any] = {"steps": steps, "warmup": warmup, "rounds": rounds, "batch_size": batch_size,
                              "perturbation_batch_size": perturbation_batch_size, "main_threads": 1,
                              "worker_threads": 1, "arms": {name: {"rounds": []} for name in arms}}
    for _ in range(rounds):
        for name, callbacks in arms.items():
            result["arms"][name]["rounds"].append(_one_run(pl, ConvNet, StepClock, loader, callbacks(), steps,
                                                           warmup, batch_size))
    for arm in result["arms"].values():
        arm["median_step_s"] = statistics.median(t for run in arm["rounds"] for t in run.pop("step_times_s"))
    plain = result["arms"]["plain"]["median_step_s"]
    for name in ("async", "sync"):
        result["arms"][name]["ratio_to_plain"] = result["arms"][name]["median_step_s"] / plain
    return result


def _one_run(pl: Any, ConvNet: Any, StepClock: Any, loader: Any, extra: list, steps: int, warmup: int,
             batch_size: int) -> dict[str, Any]:
    from asam_tune.profiler.machine_load import read_load_average

    clock = StepClock()
    trainer = pl.Trainer(max_steps=warmup + steps, accelerator="cpu", devices=1, callbacks=[clock, *extra],
                         logger=False, enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=False)
    load_before = read_load_average()
    trainer.fit(ConvNet(), loader(batch_size * (warmup + steps), batch_size))
    times = [b - a for a, b in zip(clock.starts, clock.starts[1:])][warmup:]
    run = {"median_step_s": statistics.median(times), "step_times_s": times,
           "load_average_before": load_before, "load_average_after": read_load_average()}
    if extra:
        stats = extra[0].stats()
        run["staleness_histogram"] = {str(k): v for k, v in stats.staleness_histogram.items()}
        run["fallbacks"] = stats.fallbacks
        run["worker_compute_median_s"] = stats.worker_compute_median_s
    return run


def main(argv: list[str] | None = None) -> int:
    from asam_tune.bench.provenance import emit_result, provenance

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each arm, in turn")
    parser.add_argument("--output", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = {"benchmark": "lightning_overhead", **provenance(), **measure(args.steps, args.warmup, rounds=args.rounds)}
    arms = result["arms"]
    summary = "\n".join(
        f"{name:6s} median step {arm['median_step_s'] * 1e3:7.1f} ms"
        + (f"  x{arm['ratio_to_plain']:.2f} of plain" if "ratio_to_plain" in arm else "")
        + "  load " + ", ".join(str(run["load_average_before"][0]) for run in arm["rounds"])
        for name, arm in arms.items())
    return emit_result(result, args.output, summary)


if __name__ == "__main__":
    raise SystemExit(main())
