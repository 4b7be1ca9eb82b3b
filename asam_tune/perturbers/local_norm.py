"""SyncBatchNorm without its collective: what the ascent uses, so that it never talks to other ranks.

``SyncBatchNorm`` all-reduces the batch statistics across the process group in train mode. In
the ascent that collective would run outside the main step (on a worker thread, or between
DDP's own collectives), interleaved differently on each rank: ranks would mismatch
collectives and hang. The ascent's statistics only serve its own gradient, so a rank-local
BatchNorm is right there: the ascent of SAM on each rank's ``b_p`` samples.

- Replicas (``replica_on``) turn every ``SyncBatchNorm`` into a ``LocalBatchNorm``: the same
  parameters, buffers and attributes, the plain BatchNorm forward.
- The main model itself (the in-process ascent) is left as it is; ``local_batch_norm`` gives its
  ``SyncBatchNorm`` modules the plain forward for the duration of the ascent only.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["LocalBatchNorm", "local_batch_norm", "localize_sync_batch_norm", "sync_batch_norms"]

_MISSING = object()


class LocalBatchNorm(_BatchNorm):
    """A ``SyncBatchNorm`` turned rank-local: inputs of any rank >= 2, as SyncBatchNorm takes."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


def sync_batch_norms(model: nn.Module) -> list[nn.SyncBatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]


def localize_sync_batch_norm(model: nn.Module) -> nn.Module:
    """Turn every ``SyncBatchNorm`` of ``model`` (a replica: changed in place) into a ``LocalBatchNorm``.

    The class changes, not the module object: parameters, buffers, hooks and the module order
    stay exactly as they were, so the replica's tensors still line up with the main model's.
    """
    for module in sync_batch_norms(model):
        module.__class__ = LocalBatchNorm
        module.__dict__.pop("process_group", None)
    return model


@contextlib.contextmanager
def local_batch_norm(modules: Sequence[nn.SyncBatchNorm]) -> Iterator[None]:
    """Inside the block, ``modules`` (SyncBatchNorms of a live model) run the rank-local forward.

    An instance attribute shadows the class's ``forward`` and is removed on exit (whatever
    happened inside), so the main model's own step still synchronises its statistics.
    """
    saved = [module.__dict__.get("forward", _MISSING) for module in modules]
    try:
        for module in modules:
            module.forward = _BatchNorm.forward.__get__(module)
        yield
    finally:
        for module, before in zip(modules, saved):
            if before is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = before
