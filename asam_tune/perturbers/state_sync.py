"""Keeping a worker's replica on the main model's function, sending only what changed.

The ascent differentiates the function the main step trains, so a replica needs, besides the
perturbed weights (sent with every job), the model's other parameters (frozen ones, ones the
optimizer does not hold), its buffers (BatchNorm statistics, masks) and every module's
train/eval mode. Those change rarely: a checkpoint loaded after the worker started, a
BatchNorm frozen with ``.eval()``. ``StateTracker`` tells what changed since it last looked:

- parameters and buffers from their version counters (bumped by every in-place write,
  ``load_state_dict`` included) and storage pointers: nothing is compared by value and
  nothing is copied when nothing changed. A write through ``.data`` bypasses the counter and
  is not seen;
- modes from one tuple of flags. When any mode changes, every buffer is sent again: BatchNorm's
  kernel writes its running statistics in train mode without bumping their versions (in the
  main model and in the replica alike), and they only matter once the module is in eval mode,
  which is exactly when they are sent again.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ReplicaSync", "StateChanges", "StateTracker", "StructureWatch", "apply_modes", "module_modes",
           "other_tensors", "structure_key"]


def module_modes(model: nn.Module | Sequence[nn.Module]) -> tuple[bool, ...]:
    """Every module's ``training`` flag, in ``model.modules()`` order (identical in a replica).

    A list of the modules, made once, saves walking the module tree at every job.
    """
    modules = model.modules() if isinstance(model, nn.Module) else model
    return tuple(m.training for m in modules)


def apply_modes(model: nn.Module, modes: Sequence[bool]) -> None:
    """Set each module's ``training`` flag (not ``.train()``: it would recurse and override children)."""
    for module, training in zip(model.modules(), modes):
        module.training = training


def other_tensors(model: nn.Module, perturbed: Sequence[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The parameters not perturbed, and the buffers: what the ascent reads besides the weights."""
    wanted = set(perturbed)
    others = [p for i, p in enumerate(model.parameters()) if i not in wanted]
    return others, list(model.buffers())


class StructureWatch:
    """Notices, without walking the model, that a parameter, buffer or submodule was (re)assigned in it.

    torch calls its global registration hooks on every such assignment (``module.weight =
    ...``, ``load_state_dict(assign=True)``, a layer replaced); the hook only flags the ones
    that hit this model's modules. ``close()`` removes the hooks.
    """

    def __init__(self, model: nn.Module):
        from torch.nn.modules import module as registry

        self.changed = False
        self.watch(model)
        self._handles = [registry.register_module_parameter_registration_hook(self._hook),
                         registry.register_module_buffer_registration_hook(self._hook),
                         registry.register_module_module_registration_hook(self._hook)]

    def watch(self, model: nn.Module) -> None:
        """Watch ``model``'s modules as they are now; clear the flag."""
        self._ids = {id(m) for m in model.modules()}
        self.changed = False

    def _hook(self, module: nn.Module, name: str, value: object) -> None:
        if id(module) in self._ids:
            self.changed = True

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


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
    buffers: tuple[int, ...]  # indices into the buffers to send
    modes: tuple[bool, ...] | None  # the new module modes, or None when unchanged


class StateTracker:
    """What of the main model's other parameters, buffers and modes changed since the last ``changes()``.

    Starts from the state at construction: the replica is built from the same state then.
    """

    def __init__(self, model: nn.Module, perturbed: Sequence[int]):
        self.model = model
        self.perturbed = tuple(perturbed)
        self.params, self.buffers = other_tensors(model, self.perturbed)
        self._param_keys = [_version_key(t) for t in self.params]
        self._buffer_keys = [_version_key(t) for t in self.buffers]
        # Fixed while this tracker lives: a module added or replaced rebuilds the worker
        # (``StructureWatch``), and with it the tracker.
        self._modules = list(model.modules())
        self._modes = module_modes(self._modules)

    def changes(self) -> StateChanges:
        params = self._changed(self.params, self._param_keys)
        buffers = self._changed(self.buffers, self._buffer_keys)
        modes = module_modes(self._modules)
        changed_modes = None if modes == self._modes else modes
        self._modes = modes
        if changed_modes is not None:
            buffers = tuple(range(len(self.buffers)))
        return StateChanges(params, buffers, changed_modes)

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

    ``sync(copy)`` copies what changed and sets the modes. ``copy(dst, src)`` lets a CUDA
    worker copy on its own stream.
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
            for i in changes.buffers:
                copy(self.buffers[i], self.tracker.buffers[i].detach())
        if changes.modes is not None:
            apply_modes(self.replica, changes.modes)
        return changes
