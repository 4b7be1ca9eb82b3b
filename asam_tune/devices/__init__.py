"""Everything device-specific the profiler does goes through ``ComputeDevice`` (base.py).

``FakeDevice`` (fake.py, no torch) runs the profiler in unit tests; ``TorchComputeDevice``
(torch_device.py) runs a real model on the CPU or a CUDA GPU. Importing this package
imports no torch.
"""
from asam_tune.devices.base import ComputeDevice, DeviceBroken, OutOfMemory
from asam_tune.devices.fake import FakeDevice

__all__ = ["ComputeDevice", "DeviceBroken", "OutOfMemory", "FakeDevice"]
