"""Keep, perturb and restore the weights: what the main process does with a perturbation each step.

``WeightSwap`` keeps ``w_t`` in buffers allocated once (no allocation on the step's path), adds
``e_t`` with one fused call, and restores ``w_t`` by copy, never by subtraction, so that
perturb-then-restore is bit-identical. The profiler times these same calls as part of the
per-step handover (profiler/handover.py).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["WeightSwap"]


class WeightSwap:
    """``keep()`` then ``apply(e)`` gives ``w + e``; ``restore()`` gives back ``w`` exactly."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = list(params)
        self._clean: list[torch.Tensor] | None = None
        self.kept = False

    def keep(self) -> list[torch.Tensor]:
        """Copy the current weights aside; returns the copies (valid until the next keep)."""
        with torch.no_grad():
            if self._clean is None:
                self._clean = [torch.empty_like(p) for p in self.params]
            torch._foreach_copy_(self._clean, [p.detach() for p in self.params])
        self.kept = True
        return self._clean

    @property
    def clean(self) -> list[torch.Tensor] | None:
        """The kept weights while kept, else None."""
        return self._clean if self.kept else None

    def apply(self, perturbation: Sequence[torch.Tensor]) -> None:
        """Add ``perturbation`` to the weights (one fused call when devices and dtypes agree)."""
        with torch.no_grad():
            if all(e.device == p.device and e.dtype == p.dtype for p, e in zip(self.params, perturbation)):
                torch._foreach_add_(self.params, list(perturbation))
            else:
                for p, e in zip(self.params, perturbation):
                    p.add_(e.to(device=p.device, dtype=p.dtype))

    def restore(self) -> None:
        """Put the kept weights back, bit for bit."""
        if not self.kept:
            return
        with torch.no_grad():
            torch._foreach_copy_(self.params, self._clean)
        self.kept = False
