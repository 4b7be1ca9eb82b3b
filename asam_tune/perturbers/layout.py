"""Where each tensor of a list lives in one flat buffer per dtype (the CPU worker's shared memory)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["FlatLayout"]


class FlatLayout:
    """Offsets of ``tensors`` in one flat buffer per dtype, built identically on both sides of a pipe."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.shapes = [tuple(t.shape) for t in tensors]
        self.sizes = [torch.Size(s) for s in self.shapes]  # compares with w.shape without a tuple() each
        self.dtypes = [t.dtype for t in tensors]
        self.totals: dict[torch.dtype, int] = {}
        self.offsets: list[int] = []
        for t in tensors:
            start = self.totals.get(t.dtype, 0)
            self.offsets.append(start)
            self.totals[t.dtype] = start + t.numel()

    def __len__(self) -> int:
        return len(self.shapes)

    @property
    def nbytes(self) -> int:
        return sum(n * torch.empty((), dtype=d).element_size() for d, n in self.totals.items())

    def signature(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(str(d), s) for d, s in zip(self.dtypes, self.shapes)]

    def allocate(self, device: torch.device | str = "cpu", *, shared: bool = False) -> dict[torch.dtype, torch.Tensor]:
        flats = {d: torch.zeros(n, dtype=d, device=device) for d, n in self.totals.items()}
        if shared:
            for t in flats.values():
                t.share_memory_()
        return flats

    def views(self, flats: dict[torch.dtype, torch.Tensor]) -> list[torch.Tensor]:
        return [flats[d][o:o + math.prod(s)].view(s) for d, o, s in zip(self.dtypes, self.offsets, self.shapes)]

    def groups(self, tensors: Sequence[torch.Tensor]) -> dict[torch.dtype, list[torch.Tensor]]:
        """``tensors`` (one per slot) split by their slot's dtype, in flat order."""
        out: dict[torch.dtype, list[torch.Tensor]] = {d: [] for d in self.totals}
        for d, t in zip(self.dtypes, tensors):
            out[d].append(t)
        return out
