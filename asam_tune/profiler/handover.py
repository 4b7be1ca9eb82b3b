"""What one step with a CPU worker process costs the main process: the handover.

Besides the weight copies (measured as transfers), every step the main process pays a fixed
price to use a ``ProcessPerturber``: ``submit`` (weights and the input rows into shared memory,
the job message down the pipe), ``collect`` of a result that is already there (the pipe, the
copy out of shared memory), and AsyncSAM's keep-clean-weights copy, the fused add of the
perturbation and the restore copy. For a small model it is a sizeable part of a step.

Timed by the main device's probe (the main process's cores and threads) against a real worker
started on the candidate's threads and cores, with the weights where the main step has them.
On a GPU that is the runtime's copy-stream path: submit gathers the weights on a copy stream
(the main stream waits for that gather only) and a sender thread hands the job over once they
reached page-locked memory; collect copies the result up on the copy stream and the main
stream waits for that copy. One sample is submit, then collect and the three foreach calls,
each followed by a synchronize of the main stream, so that what the main stream waits for on
the GPU (the gather, the result's copy up, the foreach kernels) is counted with what the host
pays. The worker's compute in between, and the copies on the worker's side (the transfers),
are waited for outside the timer, since the main step overlaps them.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence

import torch

from asam_tune.perturbers.ascent import parameters_at, perturbed_indices
from asam_tune.perturbers.base import AscentJob, AscentTask
from asam_tune.perturbers.batches import OutputTargetLoss
from asam_tune.perturbers.device_layer import DeviceLayer
from asam_tune.perturbers.process_parent import ProcessPerturber
from asam_tune.perturbers.weights import WeightSwap
from asam_tune.records.profile import TimingStats
from asam_tune.timing import Clock, MeasureSettings, repeat_samples
from asam_tune.workloads import Workload

# Rows of input handed over per job. Copying the rows grows with b_p and belongs to the
# per-sample curve measured elsewhere, so few rows isolate the fixed cost; two, not one, so
# that a BatchNorm over (N, C) inputs can still train on them in the worker.
HANDOVER_ROWS = 2
RHO = 0.05
# A job on a couple of rows takes milliseconds; a worker silent this long is hung.
JOB_TIMEOUT_S = 60.0
# How often the (untimed) wait for the worker looks at the pipe; sleeping, not spinning, so
# that a worker sharing the main core (one-core machines) is not starved.
_READY_POLL_S = 1e-4


def measure_handover(workload: Workload, threads: int, cores: Sequence[int] | None, *,
                     settings: MeasureSettings, clock: Clock, device: str = "cpu",
                     layer: DeviceLayer | None = None) -> TimingStats:
    """Start a worker on ``threads``/``cores``, time handovers to it from weights on ``device``
    (the main device), stop it. ``layer``: the CUDA layer (a fake one in tests)."""
    model = workload.build().to(device)  # a fresh model: the probe's own is being trained
    model.train()
    task = AscentTask(model, perturbed_indices(model, model.parameters()), OutputTargetLoss(workload.loss_fn))
    params = parameters_at(model, task.perturbed)
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    batch = workload.make_batch(HANDOVER_ROWS, generator=torch.Generator().manual_seed(0), dtype=dtype,
                                device=device)
    sync = main_stream_sync(torch.device(device))
    with ProcessPerturber(task, threads=threads, cores=cores, timeout_s=JOB_TIMEOUT_S, layer=layer) as perturber:
        return time_handovers(perturber, params, batch, settings=settings, clock=clock, sync=sync)


def main_stream_sync(device: torch.device) -> Callable[[], None]:
    """Waits for the main stream of ``device`` (its GPU work is the main step's); no-op on the CPU."""
    if device.type != "cuda":
        return lambda: None
    return lambda: torch.cuda.current_stream(device).synchronize()


def time_handovers(perturber, params: list[torch.Tensor], batch, *, settings: MeasureSettings,
                   clock: Clock, sync: Callable[[], None] = lambda: None) -> TimingStats:
    """Warm-up handovers, then timed ones until ``settings`` are met (``params`` end unchanged).

    ``sync`` waits for the main stream: called inside the timer after submit and after the
    apply, so the GPU work the main stream waits for counts.
    """
    swap = WeightSwap(params)
    steps = itertools.count()

    def one() -> float:
        start = clock.now()
        perturber.submit(AscentJob(next(steps), [p.detach() for p in params], batch, RHO, seed=0))
        sync()
        elapsed = clock.now() - start
        _wait_until_ready(perturber)  # the worker computes while the main step runs: untimed
        start = clock.now()
        result = perturber.collect()
        if result.perturbation is None:
            raise RuntimeError("the worker's perturbation was not finite: nothing to apply")
        swap.keep()  # what AsyncSAM does with it: keep w, add e, restore w
        swap.apply(result.perturbation)
        swap.restore()
        sync()
        return elapsed + clock.now() - start

    # At least one warm-up: the first submit allocates and sends the input buffers.
    for _ in range(max(settings.warmup, 1)):
        one()
    return repeat_samples(one, settings)


def _wait_until_ready(perturber) -> None:
    # Bounded: past the job's timeout collect() itself stops a hung worker and raises.
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not perturber.ready() and time.monotonic() < deadline:
        time.sleep(_READY_POLL_S)


__all__ = ["measure_handover", "time_handovers", "HANDOVER_ROWS"]
