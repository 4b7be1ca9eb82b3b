"""A worker's own copy of the model, made straight on the worker's device."""
from __future__ import annotations

import copy

import torch
from torch import nn

from asam_tune.perturbers.local_norm import localize_sync_batch_norm, sync_batch_norms

__all__ = ["replica_on"]


def replica_on(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """A deep copy of ``model`` with every parameter and buffer on ``device``, dtypes and modes kept.

    The memo hands ``deepcopy`` detached copies made straight on ``device``, so a GPU model is
    never duplicated on its own GPU and no ``.grad`` is copied (or later pickled). Module
    modes are the model's: a BatchNorm frozen with ``.eval()`` stays in eval mode. Every
    ``SyncBatchNorm`` becomes rank-local (``local_norm.py``): a replica never joins a collective,
    and its process group is not copied.
    """
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(p.detach().to(device, copy=True), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.detach().to(device, copy=True)
    for norm in sync_batch_norms(model):
        group = norm.__dict__.get("process_group")
        if group is not None:
            memo[id(group)] = None  # a process group cannot be copied; the replica needs none
    return localize_sync_batch_norm(copy.deepcopy(model, memo))
