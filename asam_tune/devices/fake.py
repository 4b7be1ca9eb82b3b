"""A device made of arithmetic: time = a + b * batch, out of memory above a limit (no torch).

Its work moves a ``FakeClock``, so profiler tests know every number exactly. With
``asynchronous=True`` it behaves like a GPU stream: work is queued and only reaches the clock
at ``synchronize()``, so a timer that forgets to synchronise measures nothing.
"""
from __future__ import annotations

from asam_tune.devices.base import DeviceBroken, OutOfMemory
from asam_tune.records.profile import DeviceConfig
from asam_tune.timing import FakeClock


class FakeDevice:
    def __init__(self, a: float, b: float, opt_time: float, *, clock: FakeClock,
                 oom_above: int | None = None, fail_at: int | None = None,
                 fail_with: BaseException | None = None, asynchronous: bool = False,
                 name: str = "x"):
        self.config = DeviceConfig(device=f"fake:{name}")
        self.a, self.b, self.opt_time = a, b, opt_time
        self.clock = clock
        self.oom_above = oom_above
        self.fail_at = fail_at  # batch size whose prepare() raises ``fail_with``
        self.fail_with = fail_with if fail_with is not None else RuntimeError(f"fake failure at batch {fail_at}")
        self.asynchronous = asynchronous
        self.prepared: list[int] = []  # every batch size prepare() was called with, in order
        self.released = 0
        self.closed = False
        self._batch: int | None = None
        self._queued = 0.0
        self._broken = False

    def _work(self, seconds: float) -> None:
        if self.asynchronous:
            self._queued += seconds
        else:
            self.clock.advance(seconds)

    def _check_usable(self) -> None:
        if self._broken or self.closed:
            raise DeviceBroken(f"{self.config.key} is no longer usable")

    def prepare(self, batch_size: int) -> None:
        self._check_usable()
        self.prepared.append(batch_size)
        if self.fail_at is not None and batch_size == self.fail_at:
            if isinstance(self.fail_with, DeviceBroken):
                self._broken = True
            raise self.fail_with
        if self.oom_above is not None and batch_size > self.oom_above:
            raise OutOfMemory(f"fake out of memory at batch {batch_size} (limit {self.oom_above})")
        self._batch = batch_size

    def forward_backward(self) -> None:
        self._check_usable()
        if self._batch is None:
            raise RuntimeError("forward_backward() before prepare()")
        self._work(self.a + self.b * self._batch)

    def optimizer_step(self) -> None:
        self._check_usable()
        self._work(self.opt_time)

    def synchronize(self) -> None:
        self.clock.advance(self._queued)
        self._queued = 0.0

    def release(self) -> None:
        self._batch = None
        self.released += 1

    def close(self) -> None:
        self.closed = True


__all__ = ["FakeDevice"]
