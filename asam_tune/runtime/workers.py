"""Which perturber ``AsyncSAM`` starts, over which module and which parameters.

The perturbers themselves live in ``asam_tune.perturbers``; this module picks one for the
device a plan or the arguments name, and builds the ``AscentTask`` they share: the module the
ascent differentiates (DDP's inner module: a replica must never join DDP's collectives) and
the perturbed parameters (the base optimizer's, SAM's convention).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from asam_tune.errors import UserInputError
from asam_tune.perturbers.ascent import perturbed_indices
from asam_tune.perturbers.base import AscentTask, Perturber
from asam_tune.perturbers.in_process import InProcessPerturber

__all__ = ["ascent_task", "in_process_factory", "process_group", "replicated_module", "trainable_key",
           "worker_factory"]

Factory = Callable[[AscentTask], Perturber]


def replicated_module(model: nn.Module) -> nn.Module:
    """What a worker computes on: DDP's inner module (no collective in the ascent)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def process_group(model: nn.Module) -> Any:
    from asam_tune.runtime.distributed import process_group_of

    return process_group_of(model)


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def trainable_key(optimizer: torch.optim.Optimizer) -> tuple:
    """The optimizer's parameters and whether each requires a gradient: the trainable set, cheaply."""
    return tuple((id(p), p.requires_grad) for p in _optimizer_params(optimizer))


def ascent_task(module: nn.Module, optimizer: torch.optim.Optimizer, compute_loss: Callable, adaptive: bool,
                *, warn: bool = False) -> AscentTask:
    """The task for the base optimizer's parameters of ``module`` that require a gradient."""
    held = _optimizer_params(optimizer)
    perturbed = perturbed_indices(module, held)
    if not perturbed:
        raise UserInputError(f"the base optimizer holds no trainable parameter of model {type(module).__name__} "
                             "to perturb (SAM perturbs the optimizer's parameters that require a gradient)")
    if warn:
        own = {id(p) for p in module.parameters()}
        outside = sum(1 for p in held if id(p) not in own)
        if outside:
            warnings.warn(f"asam-tune: the base optimizer holds {outside} parameter(s) that are not the model's; "
                          "they are descended but not perturbed", RuntimeWarning, stacklevel=4)
    return AscentTask(module, perturbed, compute_loss, adaptive)


def in_process_factory(timeout_s: float) -> Factory:
    return lambda task: InProcessPerturber(task, timeout_s=timeout_s)


def worker_factory(device: torch.device | None, threads: int | None, cores: tuple[int, ...] | None,
                   main_device: torch.device, perturber: Factory | None, *, timeout_s: float,
                   start_timeout_s: float) -> Factory:
    """How to start the worker the arguments and the plan ask for (again after a restart)."""
    if perturber is not None:
        if not callable(perturber):
            raise UserInputError(f"Invalid perturber: {perturber!r:.80} (expected a factory f(AscentTask) -> "
                                 "Perturber, e.g. lambda task: FakePerturber(task))")
        return perturber
    if device is None:
        return in_process_factory(timeout_s)
    if device.type == "cpu":
        from asam_tune.perturbers.process_parent import ProcessPerturber

        options: dict[str, Any] = {"timeout_s": timeout_s, "start_timeout_s": start_timeout_s}
        if threads is not None:
            options["threads"] = threads
        if cores is not None:
            options["cores"] = cores
        return lambda task: ProcessPerturber(task, **options)

    def stream(task: AscentTask) -> Perturber:
        from asam_tune.perturbers.stream import StreamPerturber

        return StreamPerturber(task, device=device, secondary_stream=(device == main_device), timeout_s=timeout_s)

    return stream
