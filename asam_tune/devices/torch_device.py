"""A real model on the CPU or a CUDA GPU behind the ``ComputeDevice`` interface.

The device trains a private copy of the model, so the caller's model (parameters, BatchNorm
running statistics, ``num_batches_tracked``, train/eval mode) is left exactly as it was.
The CPU's thread count is process-wide: this class does not set it; the probe process does,
before torch starts working.
"""
from __future__ import annotations

import copy
import gc
from collections.abc import Callable

import torch
from torch import nn

from asam_tune.devices.base import DeviceBroken, OutOfMemory
from asam_tune.records.profile import DeviceConfig
from asam_tune.workloads import Workload

# RuntimeError messages that mean "out of memory" (CUDA's caching allocator, the CPU allocator).
OOM_MESSAGES = ("out of memory", "CUDA out of memory", "DefaultCPUAllocator: can't allocate memory")
# Errors after which a CUDA context cannot be trusted; retrying in-process is not safe.
FATAL_CUDA_MESSAGES = ("illegal memory access", "device-side assert", "unspecified launch failure",
                       "misaligned address", "illegal instruction")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in OOM_MESSAGES)


def is_fatal_device_error(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in FATAL_CUDA_MESSAGES)


def default_optimizer(params) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay, the usual base optimizer of SAM.

    lr=0 does the same arithmetic as any other rate but leaves the copy's weights where they
    are, so hundreds of timed steps cannot drift the model into denormals or NaN.
    """
    return torch.optim.SGD(params, lr=0.0, momentum=0.9, weight_decay=5e-4)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


class TorchComputeDevice:
    """Forward+backward and optimizer steps of ``workload`` on ``config.device``.

    ``autocast_dtype`` ('bfloat16', 'float16'): the forward runs under ``torch.autocast`` to that
    dtype, as an ascent with ``AsyncSAM(ascent_dtype=...)`` does; the loss and the backward as
    autocast leaves them.
    """

    def __init__(self, workload: Workload, config: DeviceConfig, *, model: nn.Module | None = None,
                 optimizer: Callable[..., torch.optim.Optimizer] = default_optimizer, seed: int = 0,
                 autocast_dtype: str | None = None):
        if config.device.startswith("fake:"):
            raise ValueError(f"{config.device!r} is a fake device; use devices.fake.FakeDevice")
        self.config = config
        self.workload = workload
        self.device = torch.device(config.device)
        self._source_model = model  # copied lazily, in prepare(), so OOM is caught there
        self._optimizer_factory = optimizer
        self._seed = seed
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._dtype = torch.float32
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._broken: str | None = None
        self._autocast = None if autocast_dtype is None else getattr(torch, autocast_dtype)

    # -- the ComputeDevice protocol -----------------------------------------------------------

    def prepare(self, batch_size: int) -> None:
        self._guarded(lambda: self._prepare(batch_size))

    def forward_backward(self) -> None:
        self._guarded(self._forward_backward)

    def optimizer_step(self) -> None:
        self._guarded(self._optimizer.step if self._optimizer is not None else self._not_prepared)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self._guarded(lambda: torch.cuda.synchronize(self.device))

    def release(self) -> None:
        self._batch = None
        if self._model is not None:
            self._model.zero_grad(set_to_none=True)
        self._free_memory()

    def close(self) -> None:
        self._batch = None
        self._model = None
        self._optimizer = None
        self._free_memory()

    # -- the work -----------------------------------------------------------------------------

    def _prepare(self, batch_size: int) -> None:
        if self._model is None:
            source = self._source_model if self._source_model is not None else self.workload.build()
            # deepcopy: the caller's parameters and buffers are never touched, not even moved.
            model = copy.deepcopy(source).to(self.device)
            model.train()
            floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
            self._dtype = floating[0] if floating else torch.float32
            self._optimizer = self._optimizer_factory([p for p in model.parameters() if p.requires_grad])
            self._model = model
        generator = torch.Generator().manual_seed(self._seed + batch_size)
        self._batch = self.workload.make_batch(batch_size, generator=generator, device=self.device,
                                               dtype=self._dtype)

    def _forward_backward(self) -> None:
        if self._model is None or self._batch is None:
            self._not_prepared()
        x, y = self._batch
        self._model.zero_grad(set_to_none=True)
        if self._autocast is None:
            loss = self.workload.loss_fn(self._model(x), y)
        else:
            with torch.autocast(self.device.type, dtype=self._autocast):
                loss = self.workload.loss_fn(self._model(x), y)
        loss.backward()

    def _not_prepared(self) -> None:
        raise RuntimeError("prepare(batch_size) must come first")

    # -- errors and memory --------------------------------------------------------------------

    def _guarded(self, op: Callable[[], object]) -> None:
        if self._broken is not None:
            raise DeviceBroken(f"{self.config.key} is unusable after: {self._broken}")
        message = None
        try:
            op()
            return
        except Exception as exc:  # classified below, outside the handler
            if is_fatal_device_error(exc):
                self._broken = _first_line(exc)
                raise DeviceBroken(self._broken) from exc
            if not is_out_of_memory(exc):
                raise
            message = _first_line(exc)
        # Out of memory. The handler is left first: the exception's traceback holds the frames
        # that hold the activations, and they must be gone before memory can be given back.
        self._batch = None
        if self._model is not None:
            self._model.zero_grad(set_to_none=True)
        self._free_memory()
        raise OutOfMemory(message)

    def _free_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda" and self._broken is None:
            torch.cuda.empty_cache()


__all__ = ["TorchComputeDevice", "is_out_of_memory", "is_fatal_device_error", "default_optimizer",
           "OOM_MESSAGES"]
