"""The two pieces of the Lightning callback that do not touch the trainer's step.

``TrainingStepLoss``: the ascent's loss is the module's own ``training_step`` on the
perturbation's batch, with ``self.log`` and ``self.log_dict`` switched off for the call, so
that the ascent neither logs a second value nor needs the trainer's logging state. It runs on
the worker's replica (which Lightning pickles without its trainer) and, for synchronous steps
and after a worker fallback, on the trained module itself.

``PeekingIterator``: the train data fetcher's iterator with batches pulled ahead on request
and then handed on in order, so that step t can give the worker the first batch of step t+1.
Lightning does not prefetch a sized loader, so the callback pulls that batch itself.
"""
from __future__ import annotations

import collections
import inspect
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

from asam_tune.errors import UserInputError

__all__ = ["PeekingIterator", "TrainingStepLoss"]

_SILENCED = ("log", "log_dict")


def _no_log(*_: Any, **__: Any) -> None:
    """``self.log`` during the ascent: the descent logs the step's values, once."""


def _takes_batch_idx(module: nn.Module) -> bool:
    try:
        parameters = inspect.signature(module.training_step).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in parameters)


class TrainingStepLoss:
    """``compute_loss(module, batch)``: the loss ``module.training_step(batch, 0)`` returns.

    A tensor or a dict holding ``"loss"`` (Lightning's two forms). ``batch_idx`` is 0: the
    ascent's batch is not one of the epoch's indices. A class, so that it pickles for the
    CPU worker.
    """

    def __call__(self, module: nn.Module, batch: Any) -> Any:
        own = {name: module.__dict__[name] for name in _SILENCED if name in module.__dict__}
        for name in _SILENCED:
            object.__setattr__(module, name, _no_log)
        try:
            output = module.training_step(batch, 0) if _takes_batch_idx(module) else module.training_step(batch)
        finally:
            for name in _SILENCED:
                if name in own:
                    object.__setattr__(module, name, own[name])
                else:
                    object.__delattr__(module, name)
        if output is None:
            raise UserInputError("training_step returned None on the perturbation's batch, so SAM's ascent has "
                                 "no loss: return the loss, or pass compute_loss=fn(module, batch)")
        return output

    def __repr__(self) -> str:
        return "TrainingStepLoss()"


class PeekingIterator(Iterator):
    """``inner``'s items in order; ``peek(n)`` pulls ahead to the n-th coming one (0: the next).

    ``ahead``: items taken from ``inner`` earlier (before a checkpoint), handed on first.
    """

    def __init__(self, inner: Iterator, ahead: Iterable = ()):
        self.inner = inner
        self._ahead: collections.deque = collections.deque(ahead)
        self._exhausted = False

    @property
    def ahead(self) -> list:
        """The items pulled from ``inner`` and not handed on yet."""
        return list(self._ahead)

    def __next__(self) -> Any:
        if self._ahead:
            return self._ahead.popleft()
        if self._exhausted:
            raise StopIteration
        try:
            return next(self.inner)
        except StopIteration:
            self._exhausted = True
            raise

    def peek(self, n: int) -> Any:
        """The n-th coming item, or None when fewer are left."""
        while len(self._ahead) <= n and not self._exhausted:
            try:
                self._ahead.append(next(self.inner))
            except StopIteration:
                self._exhausted = True
        return self._ahead[n] if n < len(self._ahead) else None
