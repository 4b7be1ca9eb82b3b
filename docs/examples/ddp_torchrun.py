"""Asynchronous SAM under torchrun: DDP with one perturbation worker per rank.

    torchrun --nproc-per-node 2 docs/examples/ddp_torchrun.py               # CPU: gloo
    torchrun --nproc-per-node 2 docs/examples/ddp_torchrun.py --timing      # step time, agreement cost
    torchrun --nproc-per-node 2 docs/examples/ddp_torchrun.py --crash-rank 1 --crash-step 3

With one GPU per rank the same script uses NCCL and cuda:LOCAL_RANK. Each rank's worker (a CPU
process that never joins the process group) computes the rank's perturbation from the rank's
own next batch; DDP all-reduces the descent gradient as usual. AsyncSAM divides the node's
cores among the ranks' workers (each rank prints its share) and, once per step, agrees with the
other ranks on worker failures (one int all_reduce), so that a dead worker switches every rank
to synchronous SAM in the same step. ``@record`` writes a failing rank's traceback to torchrun's
error file, and torchrun's summary names it as the root cause (try ``--crash-rank``).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from asam_tune import AsyncSAM
from asam_tune.data import mnist1d_dataset
from asam_tune.workloads import load_workload


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (all ranks)")
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--perturbation-batch-size", type=int, default=16, help="b_p per rank, without a plan")
    parser.add_argument("--worker-threads", type=int, default=1, help="without a plan")
    parser.add_argument("--plan", help="a plan made with --nproc-per-node equal to torchrun's")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--timing", action="store_true", help="print step times and the agreement's cost")
    parser.add_argument("--crash-rank", type=int, help="raise on this rank (to see the failure handling)")
    parser.add_argument("--crash-step", type=int, default=3)
    return parser.parse_args()


def every_batch(loader: DataLoader, sampler: DistributedSampler):
    """One stream over the epochs, so that the look-ahead crosses epoch boundaries."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def int_all_reduce_latency(device: torch.device, repeats: int = 200) -> float:
    """Median seconds of what AsyncSAM adds per step: all_reduce of one int64, then .item()."""
    flag = torch.zeros(1, dtype=torch.int64, device=device)
    dist.barrier()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        flag.item()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


@record
def main() -> None:
    args = parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=5))
    try:
        train(args, device, local_rank)
    finally:
        # Free the DDP model (train()'s locals, and the cycles around them) before the group:
        # gloo can abort at exit otherwise ("terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()


def train(args: argparse.Namespace, device: torch.device, local_rank: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    workload = load_workload("mnist1d-cnn")
    data = mnist1d_dataset()
    model = DistributedDataParallel(workload.build().to(device),
                                    device_ids=[local_rank] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    dataset = TensorDataset(data.x_train, data.y_train)
    sampler = DistributedSampler(dataset, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    if args.plan:
        placement = {"plan": args.plan}
    else:
        placement = {"perturbation_device": "cpu", "threads": args.worker_threads,
                     "perturbation_batch_size": args.perturbation_batch_size}
    step_times = []
    # Collective: every rank builds its AsyncSAM (the node's cores are divided here).
    with AsyncSAM(model, optimizer, workload.loss_fn, rho=args.rho, **placement) as sam:
        where = sam.placement
        print(f"rank {rank}/{world}: worker pid {sam.worker_pid}, worker cores "
              f"{list(where.cores.worker) if where else None}, main threads {torch.get_num_threads()}",
              flush=True)
        batches = (b for _, b in zip(range(args.steps), every_batch(loader, sampler)))
        for step, (x, y) in enumerate(sam.lookahead(batches)):
            if rank == args.crash_rank and step == args.crash_step:
                raise RuntimeError(f"injected failure on rank {rank} at step {step}")
            started = time.perf_counter()
            loss = sam.step(x.to(device), y.to(device))
            step_times.append(time.perf_counter() - started)
            if rank == 0 and step % 100 == 0:
                print(f"step {step:4d}  loss {loss.item():.3f}", flush=True)
        stats, agreement = sam.stats(), sam.failure_agreement
    if rank == 0:
        model.eval()
        with torch.no_grad():
            correct = (model.module(data.x_test.to(device)).argmax(1) == data.y_test.to(device)).float().mean()
        print(f"{stats.steps} steps on {world} ranks; test accuracy {correct.item():.3f}; "
              f"staleness {stats.staleness_histogram}, fallbacks {stats.fallbacks}", flush=True)
    if args.timing:
        warm = step_times[len(step_times) // 10:]  # the first steps start the worker's caches
        latency = int_all_reduce_latency(device)
        per_step = agreement.seconds / agreement.calls if agreement and agreement.calls else 0.0
        # One write per line: the ranks share the terminal.
        sys.stdout.write(f"rank {rank}/{world}: step median {statistics.median(warm) * 1e3:.2f} ms over "
                         f"{len(warm)} steps (batch {args.batch_size} per rank); agreement "
                         f"{per_step * 1e6:.0f} us/step in training (waiting for the slower rank included), "
                         f"int all_reduce alone {latency * 1e6:.0f} us\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
