"""The batch-size sweep on one device configuration (no torch: it only sees ``ComputeDevice``).

Sizes are tried from small to large. Memory use grows with the batch, so the first
out-of-memory size ends the trying: it and every larger size are recorded as 'oom' (the larger
ones say they were not tried). Going upwards also means the useful small sizes are measured
before a huge allocation can fragment the device's memory. Any other error is recorded with
its message and stops the device: a device in an unknown state does not get more work.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from asam_tune.devices.base import ComputeDevice, OutOfMemory
from asam_tune.errors import UserInputError
from asam_tune.records.profile import BatchPoint
from asam_tune.timing import Clock, MeasureSettings, measure_with

DEFAULT_MAX_BATCH = 256
QUICK_BATCH_SIZES = (8, 32, 128)

Progress = Callable[[str], None]


def geometric_batch_sizes(maximum: int = DEFAULT_MAX_BATCH, start: int = 8) -> tuple[int, ...]:
    """start, 2*start, 4*start, ... up to ``maximum`` (8, 16, ..., 256 by default)."""
    if maximum < 1 or start < 1:
        raise UserInputError(f"batch sizes must be positive, got start={start!r} maximum={maximum!r}")
    sizes = []
    size = min(start, maximum)
    while size <= maximum:
        sizes.append(size)
        size *= 2
    return tuple(sizes)


def check_batch_sizes(batch_sizes: Iterable[object]) -> tuple[int, ...]:
    """Positive integers, sorted, duplicates dropped; anything else is a user error."""
    sizes = list(batch_sizes)
    bad = [b for b in sizes if isinstance(b, bool) or not isinstance(b, int) or b < 1]
    if bad:
        raise UserInputError(f"batch sizes must be positive integers, got {bad[0]!r}")
    if not sizes:
        raise UserInputError("at least one batch size is needed, got none")
    return tuple(sorted(set(sizes)))


def error_message(exc: BaseException) -> str:
    """'Type: first line of the message'; never empty (an 'error' point needs its message)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def measure_point(device: ComputeDevice, batch_size: int, settings: MeasureSettings, clock: Clock) -> BatchPoint:
    """Forward+backward and the optimizer step at one batch size, timed separately."""
    device.prepare(batch_size)
    forward_backward = measure_with(device.forward_backward, sync=device.synchronize, clock=clock,
                                    settings=settings)
    # The gradients of the last backward are in place: the step does its real arithmetic.
    optimizer_step = measure_with(device.optimizer_step, sync=device.synchronize, clock=clock,
                                  settings=settings)
    return BatchPoint(batch_size=batch_size, status="ok", forward_backward=forward_backward,
                      optimizer_step=optimizer_step)


def sweep(device: ComputeDevice, batch_sizes: Sequence[int], settings: MeasureSettings, clock: Clock,
          progress: Progress | None = None,
          on_point: Callable[[BatchPoint], None] | None = None) -> list[BatchPoint]:
    """One point per batch size, smallest first; see the module docstring for oom and errors.

    ``on_point`` sees each point as soon as it is known (a probe process streams them).
    """
    sizes = check_batch_sizes(batch_sizes)
    key = device.config.key
    points = _Points(on_point)
    failure: str | None = None  # why the device stopped, for the next size's 'error' point
    for index, size in enumerate(sizes):
        if failure is not None:
            points.append(BatchPoint(batch_size=size, status="error", error=failure))
            break
        if progress is not None:
            progress(f"{key}: batch {size}")
        stop = False
        try:
            points.append(measure_point(device, size, settings, clock))
        except OutOfMemory as exc:
            points.append(BatchPoint(batch_size=size, status="oom", error=str(exc) or None))
            points.extend(BatchPoint(batch_size=larger, status="oom",
                                     error=f"not tried: out of memory at batch {size}")
                          for larger in sizes[index + 1:])
            stop = True
        except Exception as exc:  # recorded, and this device stops
            points.append(BatchPoint(batch_size=size, status="error", error=error_message(exc)))
            stop = True
        try:
            device.release()
        except Exception as exc:  # a device that cannot free its memory gets no more work
            failure = f"release after batch {size} failed: {error_message(exc)}"
        if stop:
            break
    return list(points)


class _Points(list):
    """A list that tells ``on_point`` about every point added."""

    def __init__(self, on_point: Callable[[BatchPoint], None] | None):
        super().__init__()
        self._on_point = on_point

    def append(self, point: BatchPoint) -> None:
        super().append(point)
        if self._on_point is not None:
            self._on_point(point)

    def extend(self, points: Iterable[BatchPoint]) -> None:
        for point in points:
            self.append(point)


__all__ = ["sweep", "measure_point", "geometric_batch_sizes", "check_batch_sizes", "error_message",
           "DEFAULT_MAX_BATCH", "QUICK_BATCH_SIZES", "Progress"]
