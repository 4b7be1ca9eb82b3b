"""Dropout drawn from a generator of the worker's own, for a replica run by a thread.

A worker thread that shares the process with the main step (the CUDA-stream worker) cannot
seed the device's generator for its job: the main thread draws from the same generator at the
same time, so both would get masks that depend on timing, and neither run would repeat. The
replica's dropout modules are swapped for ``SeededDropout``, which draws its masks from a
``torch.Generator`` the worker seeds with each job's seed: the worker's masks repeat, and the
main thread's generator is left alone.

Only modules are swapped: a model that calls ``torch.nn.functional.dropout`` itself (or
``scaled_dot_product_attention`` with ``dropout_p``) still draws from the device's generator.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["SeededDropout", "use_seeded_dropout"]

# Module type -> the dimensions a mask is shared over (None: element-wise). Dropout1d/2d/3d
# zero whole channels: the mask has size 1 beyond the channel dimension.
_SWAPPED: dict[type, int | None] = {nn.Dropout: None, nn.Dropout1d: 1, nn.Dropout2d: 2, nn.Dropout3d: 3}


class SeededDropout(nn.Module):
    """``nn.Dropout`` (or ``Dropout1d/2d/3d``: ``spatial_dims``) with masks from ``generator``."""

    def __init__(self, p: float, generator: torch.Generator, spatial_dims: int | None = None):
        super().__init__()
        self.p = float(p)
        self.generator = generator
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return x * 0.0
        shape = x.shape
        if self.spatial_dims is not None and x.dim() > self.spatial_dims:
            # (N, C, *spatial) or unbatched (C, *spatial): one draw per channel.
            keep_dims = x.dim() - self.spatial_dims
            shape = (*x.shape[:keep_dims], *([1] * self.spatial_dims))
        keep = torch.rand(shape, generator=self.generator, device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, spatial_dims={self.spatial_dims}"


def use_seeded_dropout(module: nn.Module, generator: torch.Generator) -> int:
    """Swap every dropout module of ``module`` (in place, modes kept) for a ``SeededDropout``
    drawing from ``generator``; returns how many were swapped."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and type(child) in _SWAPPED:
                seeded = SeededDropout(child.p, generator, _SWAPPED[type(child)])
                seeded.train(child.training)
                parent._modules[name] = seeded
                swapped += 1
    return swapped
