"""Does a plan fit the model and the batch it is used with? Pure checks, no side effects.

A plan's ``b_p`` and its predicted times hold for one model at one batch size: the plan records
the model's signature (parameter count and the hash of its parameters' names and shapes, as the
profiler computed it) and the batch size. Used with another model, the plan is wrong in ways
nothing would show: that is an error, with the fix. Used at another batch size with the same
model, ``b_p`` is scaled in proportion and a warning says so, since the timings were predicted
at the plan's batch size.

``AsyncSAM(plan=...)`` calls ``check_model`` when it is built and ``fit_batch_size`` at the
first batch (or ``check_plan_fits`` when it knows both at once).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from asam_tune.errors import UserInputError
from asam_tune.workloads import parameter_shapes_hash

FIX = ("profile and plan this model: asam-tune profile --model PACKAGE.MODULE:FACTORY --input-shape ... "
       "--num-classes K -o profile.json, then asam-tune plan profile.json --batch-size B -o plan.json")


@dataclass(frozen=True)
class ModelSignature:
    parameter_count: int
    parameter_shapes_hash: str | None  # None: parameters given without their names

    def describe(self) -> str:
        shapes = f", shapes {self.parameter_shapes_hash}" if self.parameter_shapes_hash else ""
        return f"{self.parameter_count:,} parameters{shapes}"


@dataclass(frozen=True)
class BatchFit:
    """The ``b_p`` to use at the batch size in use, and a warning when it was rescaled."""

    perturbation_batch_size: int
    warning: str | None = None


def model_signature(model: nn.Module | Iterable[Any]) -> ModelSignature:
    """The signature the profiler records, from a module, its ``named_parameters()``, or a plain
    list of parameters (then only the count: the hash covers the names too)."""
    if isinstance(model, nn.Module):
        named = list(model.named_parameters())
    else:
        items = list(model)
        if all(isinstance(item, Tensor) for item in items):
            return ModelSignature(sum(p.numel() for p in items), None)
        if not all(isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Tensor) for item in items):
            raise UserInputError("expected an nn.Module, its named_parameters() or a list of its parameters, got "
                                 f"a list of {', '.join(sorted({type(i).__name__ for i in items})) or 'nothing'}")
        named = items
    return ModelSignature(sum(p.numel() for _, p in named), parameter_shapes_hash(named))


def check_model(plan: Any, model: nn.Module | Iterable[Any]) -> None:
    """Raise a one-line ``UserInputError`` when ``plan`` was made for another model.

    A plan-like object without a ``workload`` (a hand-made test double) is not checked.
    """
    recorded = getattr(plan, "workload", None)
    if recorded is None:
        return
    expected = ModelSignature(recorded.parameter_count, recorded.parameter_shapes_hash)
    actual = model_signature(model)
    same_count = actual.parameter_count == expected.parameter_count
    same_shapes = actual.parameter_shapes_hash is None or actual.parameter_shapes_hash == expected.parameter_shapes_hash
    if same_count and same_shapes:
        return
    what = ("the same number of parameters but other names or shapes" if same_count
            else "a different number of parameters")
    raise UserInputError(f"the plan is for model {recorded.name!r} ({expected.describe()}), this model has {what} "
                         f"({actual.describe()}): {FIX}")


def fit_batch_size(plan: Any, batch_size: int) -> BatchFit:
    """The plan's ``b_p`` at ``batch_size``: as planned at the plan's batch size, otherwise scaled
    in proportion (at least 1, at most the batch) with a warning that says so."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserInputError(f"Invalid batch size: {batch_size!r} (expected a positive integer)")
    planned_b_p = plan.perturbation_batch_size
    planned_batch = getattr(plan, "batch_size", None)
    if planned_batch is None or planned_batch == batch_size:
        return BatchFit(min(planned_b_p, batch_size))
    scaled = max(1, min(batch_size, round(planned_b_p * batch_size / planned_batch)))
    return BatchFit(scaled, f"the plan is for batch size {planned_batch}, this run's batches have {batch_size}: b_p "
                            f"scaled from {planned_b_p} to {scaled} in proportion, but the plan's timings were "
                            f"predicted at {planned_batch}; 'asam-tune plan PROFILE --batch-size {batch_size}' "
                            f"plans this batch size")


def check_plan_fits(plan: Any, model: nn.Module | Iterable[Any], batch_size: int) -> BatchFit:
    """``check_model``, then ``fit_batch_size``."""
    check_model(plan, model)
    return fit_batch_size(plan, batch_size)


__all__ = ["BatchFit", "FIX", "ModelSignature", "check_model", "check_plan_fits", "fit_batch_size",
           "model_signature"]
