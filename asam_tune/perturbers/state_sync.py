"""Keeping a worker's replica on the main model's function, sending only what changed.

The ascent differentiates the function the main step trains, so a replica needs, besides the
perturbed weights (sent with every job), the model's other parameters (frozen ones, ones the
optimizer does not hold), its buffers (BatchNorm statistics, masks) and every module's
train/eval mode.

- Other parameters can be large (a frozen backbone) and change rarely (a checkpoint loaded
  after the worker started). ``StateTracker`` tells which changed since it last looked, from
  tensor version counters (bumped by every in-place write, ``load_state_dict`` included) and
  storage pointers: nothing is compared by value and nothing is copied when nothing changed.
  A write through ``.data`` bypasses the version counter and is not seen.
- Module modes are compared as one tuple of flags.
- Buffers travel with every job. They are small (statistics, index tables), and version
  counters cannot follow them: BatchNorm's kernel updates its running statistics in train mode
  without bumping their versions. A replica's own forward writes its copies too; sending the
  main model's values each time undoes that as well.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ReplicaSync", "StateChanges", "StateTracker", "apply_modes", "module_modes", "other_tensors",
           "structure_key"]


def module_modes(model: nn.Module) -> tuple[bool, ...]:
    """Every module's ``training`` flag, in ``model.modules()`` order (identical in a replica)."""
    return tuple(m.training for m in model.modules())


def apply_modes(model: nn.Module, modes: Sequence[bool]) -> None:
    """Set each module's ``training`` flag (not ``.train()``: it would recurse and override children)."""
    for module, training in zip(model.modules(), modes):
        module.training = training


def other_tensors(model: nn.Module, perturbed: Sequence[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The parameters not perturbed, and the buffers: what the ascent reads besides the weights."""
    wanted = set(perturbed)
    others = [p for i, p in enumerate(model.parameters()) if i not in wanted]
    return others, list(model.buffers())


def structure_key(model: nn.Module, perturbed: Sequence[int]) -> tuple:
    """Identity of the model's tensors and of the perturbed set: it changes when a replica must be rebuilt.

    A module replaced, a parameter re-assigned (``load_state_dict(assign=True)``) or the set of
    trainable parameters changed all change it; in-place writes do not.
    """
    return (tuple(id(p) for p in model.parameters()), tuple(perturbed),
            tuple(id(b) for b in model.buffers()), len(list(model.modules())))


def _version_key(t: torch.Tensor) -> tuple:
    try:
        version = t._version
    except RuntimeError:  # inference tensors have no version counter: always resend
        version = object()
    return (t.data_ptr(), version)


@dataclass(frozen=True)
class StateChanges:
    params: tuple[int, ...]  # indices into the not-perturbed parameters that changed
    modes: tuple[bool, ...] | None  # the new module modes, or None when unchanged


class StateTracker:
    """What of the main model's other parameters and modes changed since the last ``changes()``.

    Starts from the state at construction: the replica is built from the same state then.
    ``buffers`` are the main model's buffers, which travel with every job.
    """

    def __init__(self, model: nn.Module, perturbed: Sequence[int]):
        self.model = model
        self.perturbed = tuple(perturbed)
        self.params, self.buffers = other_tensors(model, self.perturbed)
        self._param_keys = [_version_key(t) for t in self.params]
        self._modes = module_modes(model)

    def changes(self) -> StateChanges:
        params = self._changed(self.params, self._param_keys)
        modes = module_modes(self.model)
        changed_modes = None if modes == self._modes else modes
        self._modes = modes
        return StateChanges(params, changed_modes)

    @staticmethod
    def _changed(tensors: list[torch.Tensor], keys: list[tuple]) -> tuple[int, ...]:
        changed = []
        for i, t in enumerate(tensors):
            key = _version_key(t)
            if key != keys[i]:
                keys[i] = key
                changed.append(i)
        return tuple(changed)


Copy = Callable[[torch.Tensor, torch.Tensor], None]


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src)


class ReplicaSync:
    """Brings a replica living in this process (fake worker, CUDA-stream worker) up to the main model.

    ``sync(copy)`` copies the other parameters the main model changed and every buffer, and
    sets the modes. ``copy(dst, src)`` lets a CUDA worker copy on its own stream.
    """

    def __init__(self, model: nn.Module, replica: nn.Module, perturbed: Sequence[int]):
        self.tracker = StateTracker(model, perturbed)
        self.replica = replica
        self.params, self.buffers = other_tensors(replica, perturbed)

    def sync(self, copy: Copy = _copy) -> StateChanges:
        changes = self.tracker.changes()
        with torch.no_grad():
            for i in changes.params:
                copy(self.params[i], self.tracker.params[i].detach())
            for dst, src in zip(self.buffers, self.tracker.buffers):
                copy(dst, src.detach())
        if changes.modes is not None:
            apply_modes(self.replica, changes.modes)
        return changes
