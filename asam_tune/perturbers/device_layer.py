"""The CUDA calls of the GPU paths behind one small interface, and stand-ins that run on the CPU.

The GPU workers (``stream.py``, and ``process_parent.py`` fed from GPU weights) order their
copies and jobs with streams and events only; the main stream never waits for the host. Every
CUDA call they make goes through a ``DeviceLayer``:

  is_accelerator(device)        True where the stream path applies
  check_device(device)          the worker device, checked (UserInputError names the problem)
  current_stream(device), new_stream(device), on_stream(stream)  (a context: work queued in it
                                runs on ``stream``)
  wait_stream(waiter, other), record(stream) -> event, wait_event(stream, event)
                                GPU-side ordering; no host wait
  host_wait(event), synchronize(stream)   the host waits (worker threads only, never the main)
  copy_(dst, src, stream), gather(flat, tensors, stream)   asynchronous copies on ``stream``
  keep_alive(tensor, stream)    the caching allocator must not reuse ``tensor`` before ``stream``
                                is done with it (``record_stream``)
  cudart()                      for page-locking host memory

Implementations:
  CudaLayer        the real one (torch.cuda)
  RecordingLayer   runs every copy at once on the calling thread and records each operation
                   with a vector clock per stream, so a test can ask whether one operation is
                   ordered before another on the GPU (``ordered_before``), and which threads
                   waited for the host (``host_waits``). It also records NVTX ranges
                   (``range_push``/``range_pop``) as operations on the current stream.
  HostThreadLayer  every stream but the main one is a thread (the CPU's analogue of a copy
                   engine), for measuring on a machine without a GPU what the main thread
                   still pays for a handover (``asam_tune.bench.handover_cost``).
"""
from __future__ import annotations

import contextlib
import itertools
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from asam_tune.errors import UserInputError

__all__ = ["CudaLayer", "DeviceLayer", "HostThreadLayer", "Op", "RecordingLayer", "check_cuda_device"]


class DeviceLayer(Protocol):
    def is_accelerator(self, device: torch.device) -> bool: ...

    def check_device(self, device: Any) -> torch.device: ...

    def current_stream(self, device: torch.device) -> Any: ...

    def new_stream(self, device: torch.device) -> Any: ...

    def on_stream(self, stream: Any) -> contextlib.AbstractContextManager: ...

    def wait_stream(self, waiter: Any, other: Any) -> None: ...

    def record(self, stream: Any) -> Any: ...

    def wait_event(self, stream: Any, event: Any) -> None: ...

    def host_wait(self, event: Any) -> None: ...

    def synchronize(self, stream: Any) -> None: ...

    def copy_(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None: ...

    def gather(self, flat: torch.Tensor, tensors: Sequence[torch.Tensor], stream: Any) -> None: ...

    def keep_alive(self, tensor: torch.Tensor, stream: Any) -> None: ...

    def cudart(self) -> Any: ...


def check_cuda_device(device: Any) -> torch.device:
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UserInputError(f"Invalid device: {device!r} ({exc})") from None
    if d.type != "cuda":
        raise UserInputError(f"Invalid device: {device!r} (StreamPerturber needs a CUDA device)")
    if not torch.cuda.is_available():
        raise UserInputError(f"Invalid device: {device!r} (CUDA is not available here)")
    index = torch.cuda.current_device() if d.index is None else d.index
    if not 0 <= index < torch.cuda.device_count():
        raise UserInputError(f"Invalid device: {device!r} (there are {torch.cuda.device_count()} CUDA devices)")
    return torch.device("cuda", index)


def _flat_gather(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    torch.cat([t.detach().reshape(-1) for t in tensors], out=flat)


def _copy(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> None:
    with torch.no_grad():
        dst.copy_(src, non_blocking=non_blocking)


class CudaLayer:
    """torch.cuda, as it is."""

    def is_accelerator(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def check_device(self, device: Any) -> torch.device:
        return check_cuda_device(device)

    def current_stream(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    def new_stream(self, device: torch.device) -> Any:
        return torch.cuda.Stream(device=device)

    def on_stream(self, stream: Any) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream)

    def wait_stream(self, waiter: Any, other: Any) -> None:
        waiter.wait_stream(other)

    def record(self, stream: Any) -> Any:
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait_event(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    def host_wait(self, event: Any) -> None:
        event.synchronize()

    def synchronize(self, stream: Any) -> None:
        stream.synchronize()

    def copy_(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None:
        with torch.cuda.stream(stream):
            _copy(dst, src, non_blocking=True)

    def gather(self, flat: torch.Tensor, tensors: Sequence[torch.Tensor], stream: Any) -> None:
        with torch.cuda.stream(stream):
            _flat_gather(flat, tensors)

    def keep_alive(self, tensor: torch.Tensor, stream: Any) -> None:
        if tensor.device.type == "cuda":
            tensor.record_stream(stream)

    def cudart(self) -> Any:
        return torch.cuda.cudart()


# ---------------------------------------------------------------- a recording fake


@dataclass(frozen=True)
class FakeStream:
    name: str


@dataclass(frozen=True)
class FakeEvent:
    stamp: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Op:
    label: str
    stream: str
    stamp: dict[str, int] = field(compare=False)
    thread: str = ""


class _AcceptingCudart:
    """Registers host ranges as CUDA does: a range that overlaps one already registered is
    refused (cudaErrorHostMemoryAlreadyRegistered), so a part of a pinned buffer cannot be."""

    ALREADY_REGISTERED = 712

    def __init__(self):
        self.ranges: dict[int, int] = {}

    def cudaHostRegister(self, ptr, size, flags):
        if any(ptr < start + length and start < ptr + size for start, length in self.ranges.items()):
            return self.ALREADY_REGISTERED
        self.ranges[ptr] = size
        return 0

    def cudaHostUnregister(self, ptr):
        return 0 if self.ranges.pop(ptr, None) is not None else 1

    def cudaGetLastError(self):
        return 0


class _ThreadStreams:
    """What the fake layers share: the current stream, per thread as CUDA's is (set by
    ``on_stream``), and a cudart that registers host memory as CUDA does."""

    _local: threading.local

    def cudart(self) -> Any:
        if getattr(self, "_cudart", None) is None:
            self._cudart = _AcceptingCudart()  # one per layer, as one per process on a GPU
        return self._cudart

    def keep_alive(self, tensor: torch.Tensor, stream: Any) -> None:
        pass  # the fakes' copies run before their sources can be freed

    @contextlib.contextmanager
    def on_stream(self, stream: Any) -> Iterator[None]:
        before = getattr(self._local, "stream", None)
        self._local.stream = stream
        try:
            yield
        finally:
            self._local.stream = before


class RecordingLayer(_ThreadStreams):
    """A fake CUDA layer for CPU tests: copies run at once, every operation is stamped.

    Each stream carries a vector clock (one counter per stream). An operation on a stream
    ticks that stream's counter and takes the clock as its stamp; ``wait_stream`` and
    ``wait_event`` merge the other clock in, as the GPU orders the work. ``ordered_before(a,
    b)`` is then exactly "the GPU cannot start ``b`` before ``a`` is done", whatever order the
    host happened to issue them in. ``device_types`` are the device types it treats as GPUs.
    """

    def __init__(self, device_types: Sequence[str] = ("cpu",)):
        self.device_types = tuple(device_types)
        self.ops: list[Op] = []
        self.host_waits: list[tuple[str, str]] = []  # (thread, what)
        self._clocks: dict[str, dict[str, int]] = {}
        self._names = itertools.count(1)
        self._local = threading.local()
        self._lock = threading.RLock()
        self.main = self._stream("main")

    def _stream(self, name: str) -> FakeStream:
        self._clocks[name] = {}
        return FakeStream(name)

    # -- the DeviceLayer interface

    def is_accelerator(self, device: torch.device) -> bool:
        return torch.device(device).type in self.device_types

    def check_device(self, device: Any) -> torch.device:
        d = torch.device(device)
        if d.type not in self.device_types:
            raise UserInputError(f"Invalid device: {device!r} (this fake layer takes {self.device_types})")
        return d

    def current_stream(self, device: torch.device) -> FakeStream:
        return getattr(self._local, "stream", None) or self.main

    def new_stream(self, device: torch.device) -> FakeStream:
        with self._lock:
            return self._stream(f"side{next(self._names)}")

    def wait_stream(self, waiter: FakeStream, other: FakeStream) -> None:
        with self._lock:
            self._merge(waiter, self._clocks[other.name])

    def record(self, stream: FakeStream) -> FakeEvent:
        with self._lock:
            return FakeEvent(tuple(sorted(self._clocks[stream.name].items())))

    def wait_event(self, stream: FakeStream, event: FakeEvent) -> None:
        with self._lock:
            self._merge(stream, dict(event.stamp))

    def host_wait(self, event: FakeEvent) -> None:
        self.host_waits.append((threading.current_thread().name, "event"))

    def synchronize(self, stream: FakeStream) -> None:
        self.host_waits.append((threading.current_thread().name, f"stream {stream.name}"))

    def copy_(self, dst: torch.Tensor, src: torch.Tensor, stream: FakeStream, label: str = "copy") -> None:
        _copy(dst, src)
        self.mark(label, stream)

    def gather(self, flat: torch.Tensor, tensors: Sequence[torch.Tensor], stream: FakeStream) -> None:
        with torch.no_grad():
            _flat_gather(flat, tensors)
        self.mark("gather", stream)


    # -- NVTX, recorded as operations on the thread's current stream

    def range_push(self, message: str) -> None:
        self.mark(f"{message}:begin")

    def range_pop(self) -> None:
        pass

    def range_start(self, message: str) -> int:
        self.mark(f"{message}:begin")
        return len(self.ops)

    def range_end(self, ident: int) -> None:
        pass

    # -- what tests ask

    def mark(self, label: str, stream: FakeStream | None = None) -> Op:
        """Record ``label`` as an operation on ``stream`` (default: the thread's current one)."""
        stream = stream or self.current_stream(torch.device("cpu"))
        with self._lock:
            clock = self._clocks[stream.name]
            clock[stream.name] = clock.get(stream.name, 0) + 1
            op = Op(label, stream.name, dict(clock), threading.current_thread().name)
            self.ops.append(op)
            return op

    def _merge(self, stream: FakeStream, other: dict[str, int]) -> None:
        clock = self._clocks[stream.name]
        for name, tick in other.items():
            clock[name] = max(clock.get(name, 0), tick)

    def find(self, prefix: str) -> list[Op]:
        return [op for op in self.ops if op.label.startswith(prefix)]

    @staticmethod
    def ordered_before(a: Op, b: Op) -> bool:
        """The GPU finishes ``a`` before it starts ``b``."""
        return a is not b and a.stamp[a.stream] <= b.stamp.get(a.stream, 0)


# ---------------------------------------------------------------- copy streams as threads


class _HostStream:
    """Runs what is queued on it in order on a thread of its own (None: at once, on the caller)."""

    def __init__(self, name: str, threaded: bool):
        self.name = name
        self._jobs: queue.SimpleQueue | None = None
        if threaded:
            self._jobs = queue.SimpleQueue()
            threading.Thread(target=self._run, name=f"host-stream-{name}", daemon=True).start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job()

    def put(self, job: Callable[[], None]) -> None:
        if self._jobs is None:
            job()
        else:
            self._jobs.put(job)

    def stop(self) -> None:
        if self._jobs is not None:
            self._jobs.put(None)


class HostThreadLayer(_ThreadStreams):
    """Streams as threads: the main stream is the caller itself, every other one a thread.

    What a CPU can show of the GPU path: work queued on a side stream leaves the main thread,
    and the main thread waits only where the GPU's main stream would (``wait_event`` on it
    blocks, since the host is that stream here). ``block_main=False`` skips those waits: the
    main thread then pays only what a GPU machine's host pays (issuing the work), but nothing
    orders its own work after the side streams' (for timing a handover that changes no weight,
    never for training).
    """

    def __init__(self, block_main: bool = True):
        self.block_main = block_main
        self.main = _HostStream("main", threaded=False)
        self._streams: list[_HostStream] = []
        self._local = threading.local()

    def is_accelerator(self, device: torch.device) -> bool:
        return True

    def check_device(self, device: Any) -> torch.device:
        return torch.device(device)

    def current_stream(self, device: torch.device) -> _HostStream:
        return getattr(self._local, "stream", None) or self.main

    def new_stream(self, device: torch.device) -> _HostStream:
        stream = _HostStream(f"side{len(self._streams) + 1}", threaded=True)
        self._streams.append(stream)
        return stream

    def wait_stream(self, waiter: _HostStream, other: _HostStream) -> None:
        self.wait_event(waiter, self.record(other))

    def record(self, stream: _HostStream) -> threading.Event:
        event = threading.Event()
        stream.put(event.set)
        return event

    def wait_event(self, stream: _HostStream, event: threading.Event) -> None:
        if stream is self.main and not self.block_main:
            return
        stream.put(event.wait)

    def host_wait(self, event: threading.Event) -> None:
        event.wait()

    def synchronize(self, stream: _HostStream) -> None:
        self.record(stream).wait()

    def copy_(self, dst: torch.Tensor, src: torch.Tensor, stream: _HostStream) -> None:
        stream.put(lambda: _copy(dst, src))

    def gather(self, flat: torch.Tensor, tensors: Sequence[torch.Tensor], stream: _HostStream) -> None:
        tensors = list(tensors)
        stream.put(lambda: _flat_gather(flat, tensors))


    def close(self) -> None:
        for stream in self._streams:
            stream.stop()
