"""What a step adds for moving weights: main device -> perturbation device, and back.

Each step the runtime hands the worker the weights (all trainable parameters) and gets a
perturbation of the same size back. Timed here as one flat tensor of that size:

- CUDA <-> CPU: through pinned host memory, ``non_blocking`` copies, synchronised in the timer;
- CUDA <-> another CUDA device: a device-to-device copy, both devices synchronised;
- CPU <-> CPU (the main process and a CPU worker process): into and out of a shared-memory
  tensor (``share_memory_()``), which is what the runtime's worker exchange does.

The main device's probe runs these copies (the main process's threads and cores, as in
training). The copy does not depend on the worker's thread count, so it is measured once per
target device and recorded under each of that device's configurations (run.py).
"""
from __future__ import annotations

import torch
from torch import nn

from asam_tune.records.profile import TimingStats
from asam_tune.timing import Clock, MeasureSettings, measure_with


def trainable_numel_and_dtype(model: nn.Module) -> tuple[int, torch.dtype]:
    """How many elements the weights have, and their dtype (float32 when mixed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    dtypes = {p.dtype for p in params}
    dtype = params[0].dtype if len(dtypes) == 1 else torch.float32
    return sum(p.numel() for p in params), dtype


def _sync(*devices: torch.device):
    cuda = [d for d in devices if d.type == "cuda"]

    def sync() -> None:
        for d in cuda:
            torch.cuda.synchronize(d)

    return sync


def _buffer(numel: int, dtype: torch.dtype, device: torch.device, *, pinned: bool, shared: bool) -> torch.Tensor:
    if device.type == "cuda":
        return torch.empty(numel, dtype=dtype, device=device)
    tensor = torch.empty(numel, dtype=dtype, pin_memory=pinned)
    return tensor.share_memory_() if shared else tensor


def measure_copy_pair(numel: int, dtype: torch.dtype, source: torch.device, target: torch.device, *,
                      settings: MeasureSettings, clock: Clock) -> tuple[TimingStats, TimingStats, bool]:
    """(to target, back to source, pinned) for a flat tensor of ``numel`` elements."""
    pinned = (source.type == "cuda") != (target.type == "cuda")
    cpu_to_cpu = source.type == "cpu" and target.type == "cpu"
    # The runtime's buffers: pinned host memory next to a GPU, shared memory between processes.
    src = _buffer(numel, dtype, source, pinned=pinned, shared=False)
    src.normal_()
    dst = _buffer(numel, dtype, target, pinned=pinned, shared=cpu_to_cpu)
    back = _buffer(numel, dtype, source, pinned=pinned, shared=False)
    sync = _sync(source, target)
    non_blocking = pinned or (source.type == "cuda" and target.type == "cuda")
    to_target = measure_with(lambda: dst.copy_(src, non_blocking=non_blocking), sync=sync, clock=clock,
                             settings=settings)
    to_source = measure_with(lambda: back.copy_(dst, non_blocking=non_blocking), sync=sync, clock=clock,
                             settings=settings)
    return to_target, to_source, pinned


__all__ = ["measure_copy_pair", "trainable_numel_and_dtype"]
