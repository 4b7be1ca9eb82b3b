"""A worker's own copy of the model, made straight on the worker's device."""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from asam_tune.perturbers.local_norm import localize_sync_batch_norm, sync_batch_norms

__all__ = ["replica_on", "snapshot_replica"]


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


def snapshot_replica(model: nn.Module, perturbed: Sequence[int]) -> nn.Module:
    """A replica on the model's own device that holds about one copy of the perturbed weights.

    The perturbed parameters are fresh tensors (the snapshot each job copies ``w_t`` into), the
    other parameters are the model's own objects (the ascent reads them and never writes
    them), and the buffers are clones (the ascent's forward writes BatchNorm's statistics).
    A replica rather than ``torch.func.functional_call`` on the model itself: that swaps the
    module's attributes for the duration of the call, which a worker thread cannot do while
    the main thread runs the same module.
    """
    wanted = set(perturbed)
    memo: dict[int, object] = {}
    for i, p in enumerate(model.parameters()):
        memo[id(p)] = (nn.Parameter(torch.empty_like(p.detach()), requires_grad=p.requires_grad) if i in wanted
                       else p)
    for b in model.buffers():
        memo[id(b)] = b.detach().clone()
    for norm in sync_batch_norms(model):
        group = norm.__dict__.get("process_group")
        if group is not None:
            memo[id(group)] = None
    return localize_sync_batch_norm(copy.deepcopy(model, memo))
