"""Batches of any structure: one slicing rule, and a flat form a worker process can share.

A batch is a tensor, or a tuple, list or mapping (dict, Hugging Face's ``BatchEncoding``) of
batches, nested; the batch dimension comes first in every tensor. The ascent batch ``S`` is
the first ``b_p`` samples of every tensor leaf with at least one dimension; other leaves
(numbers, strings, ``None``, 0-dim tensors) are kept as they are.

``flatten`` splits a batch into its tensor leaves and a ``spec`` (picklable, holding the
structure and the other leaves) so the CPU worker gets the tensors through shared memory and
the structure over its pipe only when it changes.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from asam_tune.errors import UserInputError

__all__ = ["OutputTargetLoss", "batch_size_of", "flatten", "map_tensors", "slice_batch", "tensor_ids", "unflatten"]


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if _is_namedtuple(batch):
        return type(batch)(*(map_tensors(v, fn) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    if isinstance(batch, Mapping):
        return _rebuild_mapping(type(batch), [(k, map_tensors(v, fn)) for k, v in batch.items()])
    return batch


def _rebuild_mapping(kind: type, items: list[tuple[Any, Any]]) -> Any:
    try:
        return kind(dict(items))
    except Exception:  # noqa: BLE001 - a mapping type that cannot be built from a dict
        return dict(items)


def _tensor_leaves(batch: Any) -> list[torch.Tensor]:
    leaves: list[torch.Tensor] = []
    map_tensors(batch, leaves.append)
    return leaves


def batch_size_of(batch: Any) -> int:
    """The number of samples: the first dimension of the first tensor leaf with one."""
    for leaf in _tensor_leaves(batch):
        if leaf.dim() >= 1:
            return int(leaf.shape[0])
    raise UserInputError(f"Invalid batch: {type(batch).__name__} {batch!r:.80} has no tensor with a batch "
                         "dimension (expected a tensor, or a tuple, list or dict of tensors)")


def tensor_ids(batch: Any) -> tuple[int, ...]:
    """Identity of a batch's tensors: the same batch handed over twice has the same ids."""
    return tuple(id(t) for t in _tensor_leaves(batch))


def slice_batch(batch: Any, rows: int | None) -> Any:
    """The first ``rows`` samples of every tensor leaf with a batch dimension (all if None)."""
    if rows is None:
        return batch
    return map_tensors(batch, lambda t: t[:rows] if t.dim() >= 1 else t)


# A spec is nested tuples: ("t", leaf_index) | ("c", constant) | ("seq", kind, children)
# | ("nt", kind, children) | ("map", kind, ((key, child), ...)).


def flatten(batch: Any) -> tuple[list[torch.Tensor], tuple]:
    """The tensor leaves of ``batch`` in a fixed order, and the spec that rebuilds it."""
    leaves: list[torch.Tensor] = []

    def walk(value: Any) -> tuple:
        if isinstance(value, torch.Tensor):
            leaves.append(value)
            return ("t", len(leaves) - 1)
        if _is_namedtuple(value):
            return ("nt", type(value), tuple(walk(v) for v in value))
        if isinstance(value, (tuple, list)):
            return ("seq", type(value), tuple(walk(v) for v in value))
        if isinstance(value, Mapping):
            return ("map", type(value), tuple((k, walk(v)) for k, v in value.items()))
        return ("c", value)

    return leaves, walk(batch)


def unflatten(spec: tuple, leaves: list[torch.Tensor]) -> Any:
    """The batch ``flatten`` took apart, with ``leaves`` in place of its tensors."""
    tag = spec[0]
    if tag == "t":
        return leaves[spec[1]]
    if tag == "c":
        return spec[1]
    if tag == "nt":
        return spec[1](*(unflatten(s, leaves) for s in spec[2]))
    if tag == "seq":
        return spec[1](unflatten(s, leaves) for s in spec[2])
    if tag == "map":
        return _rebuild_mapping(spec[1], [(k, unflatten(s, leaves)) for k, s in spec[2]])
    raise ValueError(f"unknown batch spec tag {tag!r}")


class OutputTargetLoss:
    """``compute_loss(model, batch)`` for the classic ``loss_fn(model(x), y)`` on ``(x, y)`` batches.

    A class, not a closure, so that it pickles for the CPU worker whenever ``loss_fn`` does.
    """

    def __init__(self, loss_fn: Callable[[Any, Any], torch.Tensor]):
        self.loss_fn = loss_fn

    def __call__(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            shape = f" of shape {tuple(batch.shape)}" if isinstance(batch, torch.Tensor) else ""
            raise UserInputError(f"loss_fn(output, target) needs (inputs, targets) batches, got a "
                                 f"{type(batch).__name__}{shape}; pass compute_loss=fn(model, batch) for other batches")
        return self.loss_fn(model(batch[0]), batch[1])

    def __repr__(self) -> str:
        return f"OutputTargetLoss({self.loss_fn!r})"
