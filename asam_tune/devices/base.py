"""The small interface between the profiler and a device that trains a model (no torch).

Protocol, for one batch size at a time:
  prepare(batch_size)  build the model copy (once) and a batch of that size on the device
  forward_backward()   one forward, loss and backward on that batch (queued work allowed)
  optimizer_step()     one step of the base optimizer with the gradients present
  synchronize()        wait until the device has finished everything queued
  release()            drop the batch and per-size memory (also after an error); the model
                       copy stays for the next size
  close()              drop everything; idempotent

Any of the first four may raise ``OutOfMemory`` (recorded as 'oom', the sweep goes on) or
``DeviceBroken`` (the device cannot be used again in this process); any other exception is
recorded as an error and stops the device.
"""
from __future__ import annotations

from typing import Protocol

from asam_tune.records.profile import DeviceConfig


class OutOfMemory(Exception):
    """The device ran out of memory at this batch size; smaller sizes may still fit."""


class DeviceBroken(Exception):
    """The device is unusable in this process (e.g. a CUDA illegal memory access)."""


class ComputeDevice(Protocol):
    config: DeviceConfig

    def prepare(self, batch_size: int) -> None: ...

    def forward_backward(self) -> None: ...

    def optimizer_step(self) -> None: ...

    def synchronize(self) -> None: ...

    def release(self) -> None: ...

    def close(self) -> None: ...


__all__ = ["ComputeDevice", "OutOfMemory", "DeviceBroken"]
