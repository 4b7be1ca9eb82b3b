"""Asynchronous SAM with mixed precision: GradScaler through the explicit API, no closure.

    python docs/examples/amp_loop.py               # GPU: float16 autocast; CPU: bfloat16 autocast
    python docs/examples/amp_loop.py --steps 5     # a smoke run

Asynchronous SAM does one backward per step on the main device, so the usual AMP recipe runs
unchanged: one ``scaler.scale(loss).backward()``, one ``scaler.step`` (hence one ``unscale_``)
and one ``scaler.update()`` per step. The loop hands the next batch to the worker itself, which
is what ``sam.lookahead`` + ``sam.step`` do for plain loops. The worker computes the
perturbation in the model's own precision (float32), outside autocast. On the CPU, bfloat16
needs no loss scaling; the scaler is kept so that the loop is the one a GPU runs.
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
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--perturbation-batch-size", type=int, default=32)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=0.05)
    return parser.parse_args()


def with_next(iterable):
    """(batch, next batch or None): the look-ahead the worker needs, by hand."""
    iterator = iter(iterable)
    current = next(iterator, None)
    while current is not None:
        following = next(iterator, None)
        yield current, following
        current = following


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    torch.manual_seed(0)
    workload = load_workload("mnist1d-cnn")
    data = mnist1d_dataset()
    model = workload.build().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    loader = batches(data.x_train, data.y_train, args.batch_size, shuffle=True,
                     generator=torch.Generator().manual_seed(0))
    total = args.epochs * len(loader) if args.steps is None else args.steps
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    scaler = torch.amp.GradScaler(device.type)
    loss_fn = workload.loss_fn

    stream = itertools.islice((batch for _ in range(args.epochs) for batch in loader), total)
    started = time.perf_counter()
    with AsyncSAM(model, optimizer, loss_fn, rho=args.rho, perturbation_device="cpu", threads=1,
                  perturbation_batch_size=args.perturbation_batch_size) as sam:
        for step, ((x, y), following) in enumerate(with_next(stream)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            # w_t + e_t inside; the worker gets w_t and the next batch's first b_p samples.
            with sam.perturbed(x, y, next_batch=following):
                with torch.autocast(device.type, dtype=amp_dtype):
                    loss = loss_fn(model(x), y)
                scaler.scale(loss).backward()
            scaler.step(optimizer)  # after the block: the weights are w_t again
            scaler.update()
            sam.finish_step()
            scheduler.step()
            if step % 40 == 0:
                print(f"step {step:4d}  loss {loss.item():.3f}  scale {scaler.get_scale():g}")
        stats = sam.stats()
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype):
        correct = (model(data.x_test.to(device)).argmax(1) == data.y_test.to(device)).float().mean().item()
    print(f"{stats.steps} steps in {time.perf_counter() - started:.1f} s on {device} with {amp_dtype}; "
          f"test accuracy {correct:.3f}; staleness {stats.staleness_histogram}, "
          f"skipped perturbations {stats.skipped_perturbations}")


if __name__ == "__main__":
    main()
