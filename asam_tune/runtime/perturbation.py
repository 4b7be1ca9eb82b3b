"""The SAM math shared by every perturbation worker and by the main process.

One function computes the ascent perturbation ``e = rho * g / ||g||``; the synchronous path,
the CPU worker process and the CUDA-stream worker all call it, so staleness=0 really is
"synchronous SAM through the same code".
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters SAM perturbs, in a fixed order shared by the main model and replicas."""
    return [p for p in model.parameters() if p.requires_grad]


def ascent_perturbation(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    rho: float,
) -> list[torch.Tensor] | None:
    """``rho * g / ||g||`` for the gradient ``g`` of ``loss_fn(model(x), y)`` at the model's weights.

    Returns one tensor per trainable parameter (zeros where a parameter got no gradient), or
    ``None`` when the gradient is not finite: the caller skips that perturbation. A zero
    gradient gives a zero perturbation. The model's ``.grad`` fields are left as None.
    The caller owns the model's mode and buffers (a replica's BatchNorm statistics are thrown
    away; see the runtime).
    """
    params = trainable_parameters(model)
    if not params:
        return []
    for p in params:
        p.grad = None
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    # fp64 for the norm if any gradient is fp64 (mixed-precision models), else fp32.
    wide = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=wide) for g in grads]))
    if not torch.isfinite(norm):
        return None
    if norm == 0:
        return [torch.zeros_like(g) for g in grads]
    scale = rho / norm
    return [(g.to(wide) * scale).to(g.dtype) for g in grads]
