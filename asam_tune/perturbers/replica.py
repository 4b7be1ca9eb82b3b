"""A worker's own copy of the model, made straight on the worker's device."""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["replica_on"]


def replica_on(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """A deep copy of ``model`` with every parameter and buffer on ``device``, dtypes and modes kept.

    The memo hands ``deepcopy`` detached copies made straight on ``device``, so a GPU model is
    never duplicated on its own GPU and no ``.grad`` is copied (or later pickled). Module
    modes are the model's: a BatchNorm frozen with ``.eval()`` stays in eval mode.
    """
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(p.detach().to(device, copy=True), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.detach().to(device, copy=True)
    return copy.deepcopy(model, memo)
