"""The CPU worker's handover from GPU weights, on a copy stream of its own (``ProcessPerturber``).

The copy stream waits for the main stream, gathers the weights into one flat GPU buffer per
dtype, and the main stream waits for that gather only (a device-to-device copy) before it
perturbs the weights; the copy stream then copies the gathered weights and the batch into the
page-locked shared buffers, and a sender thread hands the job to the worker once that copy is
done. The result comes back the same way: copied up on the copy stream, the main stream
waiting for that copy on the GPU. The main thread never waits for the host; the next job's
copies follow the last result's on the same stream, so the worker cannot overwrite a result
still being read.

Every CUDA call goes through a ``DeviceLayer`` (``device_layer.py``), so that the ordering is
tested on the CPU with a fake one.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from asam_tune.perturbers.device_layer import DeviceLayer
from asam_tune.perturbers.layout import FlatLayout
from asam_tune.perturbers.process_lifecycle import WorkerHandle, register_host

__all__ = ["CopyStreamHandover"]


class CopyStreamHandover:
    """Copy streams, page-locking, staging and output buffers, and the sender thread of one worker."""

    def __init__(self, layer: DeviceLayer, handle: WorkerHandle):
        self.layer = layer
        self._handle = handle
        self._streams: dict[torch.device, object] = {}
        self._sender = None  # the thread that sends a GPU-fed job once its copies are done
        self._staging: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._outputs: dict[torch.device, list] = {}
        self._pinned: set[int] = set()

    def is_accelerator(self, device: torch.device) -> bool:
        return self.layer.is_accelerator(device)

    def stream(self, device: torch.device):
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = self.layer.new_stream(device)
        return stream

    def pin(self, t: torch.Tensor) -> bool:
        """Page-lock ``t`` (a shared host buffer) once; False when CUDA refused (copies stay pageable)."""
        key = t.data_ptr()
        if key not in self._pinned:
            cudart = self.layer.cudart()
            if register_host(self._handle, t, cudart):
                self._handle.cudart = cudart
                self._pinned.add(key)
        return key in self._pinned

    def copy_to_host(self, dst: torch.Tensor, src: torch.Tensor, device: torch.device, *,
                     keep_alive: bool = False) -> None:
        """``dst`` (shared, host) from ``src`` (on ``device``) on the copy stream; ``keep_alive``:
        the caller may free ``src`` before the copy ran (a batch). The caller pins the whole
        buffer ``dst`` lies in first: CUDA refuses to register a part of a registered range."""
        copy = self.stream(device)
        self.layer.copy_(dst, src, copy)
        if keep_alive:
            self.layer.keep_alive(src, copy)

    def gather_weights(self, device: torch.device, weights: Sequence[torch.Tensor], layout: FlatLayout,
                       shared: dict[torch.dtype, torch.Tensor]) -> None:
        """``weights`` into the ``shared`` flat buffers, the main stream waiting for the gather only."""
        layer = self.layer
        main, copy = layer.current_stream(device), self.stream(device)
        layer.wait_stream(copy, main)  # w_t is what the main stream's queued work leaves
        groups = layout.groups(weights)
        with layer.on_stream(copy):  # the staging buffers are the copy stream's memory
            for dtype, group in groups.items():
                staging = self._staging.get((device, dtype))
                if staging is None:
                    staging = self._staging[(device, dtype)] = torch.empty(
                        layout.totals[dtype], dtype=dtype, device=device)
                layer.gather(staging, group, copy)
        # The main stream perturbs w_t in place next: after the gather (on the GPU), not after
        # the copy to the host.
        layer.wait_event(main, layer.record(copy))
        for dtype in groups:
            self.pin(shared[dtype])
            layer.copy_(shared[dtype], self._staging[(device, dtype)], copy)  # DMA into page-locked memory

    def send_when_copied(self, message, device: torch.device) -> None:
        """Send ``message`` from the sender thread once the copy stream has passed its copies."""
        from asam_tune.perturbers.stream import JobThread

        layer, conn = self.layer, self._handle.conn
        copied = layer.record(self.stream(device))
        if self._sender is None:
            self._sender = JobThread(name="asam-handover-sender")

        def send() -> None:
            layer.host_wait(copied)
            conn.send(message)  # a broken pipe shows as the worker's death at collect

        self._sender.start(send)

    def sender_done(self, timeout_s: float) -> bool:
        """Wait for a job still on its way; False when it was not sent within ``timeout_s``."""
        sender = self._sender
        if sender is None or sender.done():
            return True
        try:
            return sender.wait(time.monotonic() + timeout_s) is not None
        except RuntimeError:
            return False

    def read_up(self, device: torch.device, layout: FlatLayout,
                perturbation: dict[torch.dtype, torch.Tensor]) -> list[torch.Tensor]:
        """The shared ``perturbation`` copied up to ``device``; views valid until the next call."""
        layer, copy = self.layer, self.stream(device)
        outputs = self._outputs.get(device)
        if outputs is None:
            with layer.on_stream(copy):  # the copy stream's memory, written there
                flats = layout.allocate(device)
            self._outputs[device] = outputs = [flats, layout.views(flats)]
        flats, views = outputs
        main = layer.current_stream(device)
        layer.wait_stream(copy, main)  # the main stream may still read the last result from these buffers
        for dtype, src in perturbation.items():
            self.pin(src)
            layer.copy_(flats[dtype], src, copy)
        # The main stream uses the result after its copy, on the GPU. The next job is sent
        # after this copy too (same stream): the worker cannot overwrite what is being read.
        layer.wait_event(main, layer.record(copy))
        return views

    def close(self) -> None:
        if self._sender is not None:
            self._sender.stop(0.0)
            self._sender = None
        self._staging.clear()
        self._streams.clear()
        self._outputs.clear()
