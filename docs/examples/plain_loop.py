"""Asynchronous SAM in a plain training loop: the built-in MNIST-1D CNN on the CPU.

    python docs/examples/plain_loop.py                         # CPU worker, 1 thread, b_p = 32
    python docs/examples/plain_loop.py --plan runs/plan.json   # the plan's device, threads, cores and b_p
    python docs/examples/plain_loop.py --steps 5               # a smoke run

A plan comes from ``asam-tune profile`` then ``asam-tune plan`` (see the README). Without one,
the perturbation runs in a CPU worker process with one thread, on the first ``b_p`` samples of
the next batch, one step behind the weights. Three epochs take well under a minute on one core.
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch

from asam_tune import AsyncSAM
from asam_tune.data import batches, mnist1d_dataset
from asam_tune.workloads import load_workload


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", help="a plan file (asam-tune plan); default: a 1-thread CPU worker")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--perturbation-batch-size", type=int, default=32, help="b_p, without a plan")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=0.05)
    return parser.parse_args()


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return correct


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    workload = load_workload("mnist1d-cnn")
    data = mnist1d_dataset()
    model = workload.build()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    loader = batches(data.x_train, data.y_train, args.batch_size, shuffle=True,
                     generator=torch.Generator().manual_seed(0))
    total = args.epochs * len(loader) if args.steps is None else args.steps
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)  # on the base optimizer

    if args.plan:
        placement = {"plan": args.plan}
    else:
        placement = {"perturbation_device": "cpu", "threads": 1,
                     "perturbation_batch_size": args.perturbation_batch_size}
    # One stream over every epoch, so that the look-ahead crosses epoch boundaries too.
    stream = itertools.islice((batch for _ in range(args.epochs) for batch in loader), total)
    started = time.perf_counter()
    with AsyncSAM(model, optimizer, workload.loss_fn, rho=args.rho, **placement) as sam:
        for step, (x, y) in enumerate(sam.lookahead(stream)):
            loss = sam.step(x, y)  # perturb with e_t, one backward, restore w_t, base step
            scheduler.step()
            if step % 40 == 0:
                print(f"step {step:4d}  loss {loss.item():.3f}")
        stats = sam.stats()
    elapsed = time.perf_counter() - started
    print(f"{stats.steps} steps in {elapsed:.1f} s; test accuracy {accuracy(model, data.x_test, data.y_test):.3f}")
    print(f"worker: staleness {stats.staleness_histogram}, waited {stats.wait_total_s:.2f} s in total, "
          f"median job {stats.worker_compute_median_s * 1e3:.1f} ms, b_p {stats.perturbation_batch_size}")


if __name__ == "__main__":
    main()
