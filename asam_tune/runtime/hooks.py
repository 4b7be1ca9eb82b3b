"""The hooks ``AsyncSAM`` puts on the model and the base optimizer, and why.

- The optimizer must not step inside ``perturbed()``: it would descend from ``w_t + e_t`` and
  the restore would then throw the step away. A pre-hook refuses it.
- ``finish_step()`` must follow every optimizer step: a post-hook notes that one happened.
- ``model.state_dict()`` inside ``perturbed()`` must still hold the clean weights ``w_t``, so
  that a checkpoint taken there (a trainer's callback) never saves perturbed weights.

Weak references throughout: neither the optimizer nor the model keeps ``AsyncSAM`` alive.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from asam_tune.errors import UserInputError

__all__ = ["CleanStateDictHook", "install_hooks"]


class CleanStateDictHook:
    """Makes ``model.state_dict()`` inside ``perturbed()`` hold the clean weights ``w_t``.

    Pickles and deep-copies as an inert hook, so ``torch.save(model)`` and replicas still work.
    """

    def __init__(self, sam: Any | None):
        self._sam = None if sam is None else weakref.ref(sam)

    def __call__(self, module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
        sam = None if self._sam is None else self._sam()
        clean = None if sam is None else sam._swap.clean
        if clean is None or module is not sam.model:
            return
        clean_by_id = {id(p): c for p, c in zip(sam._params, clean)}
        for name, param in module.named_parameters(remove_duplicate=False):
            kept = clean_by_id.get(id(param))
            if kept is not None and prefix + name in state_dict:
                state_dict[prefix + name] = kept.detach().clone()  # the buffer is reused next step

    def __reduce__(self):
        return (CleanStateDictHook, (None,))

    def __deepcopy__(self, memo: dict) -> CleanStateDictHook:
        return CleanStateDictHook(None)


def install_hooks(sam: Any, model: nn.Module, optimizer: torch.optim.Optimizer) -> list:
    """Register the three hooks; returns their handles (removed by ``AsyncSAM.close()``)."""
    me = weakref.ref(sam)

    def before_optimizer_step(*_: Any) -> None:
        owner = me()
        if owner is not None and owner._swap.kept:
            raise UserInputError("the base optimizer stepped inside perturbed(): step it after the "
                                 "block, when the weights are w_t again")

    def after_optimizer_step(*_: Any) -> None:
        owner = me()
        if owner is not None:
            owner._optimizer_stepped = True

    return [
        optimizer.register_step_pre_hook(before_optimizer_step),
        optimizer.register_step_post_hook(after_optimizer_step),
        model.register_state_dict_post_hook(CleanStateDictHook(sam)),
    ]
