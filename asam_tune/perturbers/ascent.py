"""The SAM math every worker and the main process share: which weights, which seed, which ascent.

One function computes the ascent perturbation ``e = rho * g / ||g||`` (or adaptive SAM's
``e = rho * w^2 g / ||w g||``, Kwon et al. 2021); the in-process path, the CPU worker process,
the CUDA-stream worker and the fake all call it, so staleness 0 really is "synchronous SAM
through the same code".
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from asam_tune.dtypes import ASCENT_DTYPE_NAMES

__all__ = ["ASCENT_DTYPES", "ascent_perturbation", "check_ascent_dtype", "job_seed", "parameters_at",
           "perturbed_indices", "seeded"]

_MASK64 = (1 << 64) - 1
# What the ascent may run in besides the parameters' own dtype (None).
ASCENT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# An fp16 ascent's loss is multiplied by this before the backward, so that small gradients of
# fp16 activations (below fp16's 6e-8) do not flush to zero. The perturbation is normalised,
# so the scale never needs undoing; a backward that overflows is redone unscaled (forward and
# backward once more: keeping the graph for it would hold the activations through every job).
FP16_LOSS_SCALE = 2.0 ** 10


def check_ascent_dtype(value: Any) -> torch.dtype | None:
    """None, ``torch.bfloat16`` or ``torch.float16`` (or their names); ``"parameters"`` is None
    said explicitly (it overrides a plan's dtype); anything else is refused."""
    if value is None or value == "parameters":
        return None
    if isinstance(value, str):
        # The names the CLI takes too ('bf16', 'fp16', 'half').
        found = ASCENT_DTYPES.get(ASCENT_DTYPE_NAMES.get(value.strip().lower().removeprefix("torch."), ""))
    else:
        found = value if value in ASCENT_DTYPES.values() else None
    if found is None:
        from asam_tune.errors import UserInputError

        raise UserInputError(f"Invalid ascent_dtype: {value!r} (need None, 'parameters', torch.bfloat16 or "
                             f"torch.float16)")
    return found


def perturbed_indices(model: nn.Module, optimizer_params: Iterable[torch.Tensor]) -> tuple[int, ...]:
    """Positions in ``model.parameters()`` of the parameters SAM perturbs.

    SAM's convention: the base optimizer's parameters (its ``param_groups``) that require a
    gradient. The order is the model's, identical in every replica of it.
    """
    wanted = {id(p) for p in optimizer_params}
    return tuple(i for i, p in enumerate(model.parameters()) if id(p) in wanted and p.requires_grad)


def parameters_at(model: nn.Module, indices: Sequence[int]) -> list[nn.Parameter]:
    params = list(model.parameters())
    return [params[i] for i in indices]


def job_seed(base_seed: int, step: int) -> int:
    """The random seed of the ascent job serving ``step`` (splitmix64 of the two).

    A pure function of the run's seed and the step, so that a retried job, a fallback and a
    resumed run draw the same dropout masks as the job they replace.
    """
    z = (base_seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Draw from ``seed`` inside the block; the caller's random state is untouched after it.

    Forks the CPU generator and, for a CUDA ``device``, that device's generator only.
    """
    cuda = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda, device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def _as_loss(value: Any) -> torch.Tensor:
    """The loss tensor of ``compute_loss``'s result (a tensor, or a model output holding ``loss``)."""
    loss = value
    if not isinstance(value, torch.Tensor):
        loss = value["loss"] if isinstance(value, Mapping) and "loss" in value else getattr(value, "loss", value)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"the loss must be a tensor with one element, got {type(value).__name__}: {value!r:.80}")
    return loss.reshape(())


def _gradient_and_norm(loss: torch.Tensor, params: Sequence[torch.Tensor],
                       adaptive: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The gradient of ``loss`` (zeros where a parameter got none) and the norm SAM divides by."""
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    wide = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    if adaptive:
        norm_terms = [torch.linalg.vector_norm(p.detach().abs().to(wide) * g.to(wide)) for p, g in zip(params, grads)]
    else:
        norm_terms = [torch.linalg.vector_norm(g, dtype=wide) for g in grads]
    return grads, torch.linalg.vector_norm(torch.stack(norm_terms))


def ascent_perturbation(
    model: nn.Module,
    compute_loss: Callable[[nn.Module, Any], Any],
    batch: Any,
    params: Sequence[torch.Tensor],
    rho: float,
    *,
    adaptive: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> list[torch.Tensor] | None:
    """The perturbation for ``params`` from the gradient of ``compute_loss(model, batch)``.

    ``rho * g / ||g||``, or with ``adaptive`` ``rho * w^2 g / ||w g||`` (element-wise ``|w|``).
    Returns one tensor per parameter (zeros where a parameter got no gradient), or ``None``
    when the gradient is not finite: the caller skips that perturbation. A zero gradient gives
    a zero perturbation. ``.grad`` fields are not touched. The loss may also be an object with
    a ``loss`` attribute or key (a Hugging Face model output). The norm and the scale are in
    fp32 (fp64 when a gradient is fp64), whatever the parameters' dtype.

    ``autocast_dtype`` (``torch.bfloat16`` or ``torch.float16``) runs the forward under
    ``torch.autocast`` on the parameters' device type, as a mixed-precision descent does; the
    gradients (and the result) keep the parameters' dtype. Autocast is per thread: every
    worker enters it itself, here.
    """
    if not params:
        return []
    def loss_of() -> torch.Tensor:
        if autocast_dtype is None:
            return _as_loss(compute_loss(model, batch))
        with torch.autocast(device_type=params[0].device.type, dtype=autocast_dtype):
            loss = _as_loss(compute_loss(model, batch))
        return loss.float() if loss.dtype in (torch.float16, torch.bfloat16) else loss

    if autocast_dtype is torch.float16:
        grads, norm = _gradient_and_norm(loss_of() * FP16_LOSS_SCALE, params, adaptive)
        if not torch.isfinite(norm):  # the scaled backward overflowed fp16: once more, unscaled
            del grads  # before the second forward: one set of activations and gradients at a time
            grads, norm = _gradient_and_norm(loss_of(), params, adaptive)
    else:
        grads, norm = _gradient_and_norm(loss_of(), params, adaptive)
    if not torch.isfinite(norm):
        return None
    if norm == 0:
        return [torch.zeros_like(g) for g in grads]
    wide = norm.dtype
    scale = rho / norm
    if adaptive:
        return [(p.detach().abs().to(wide) ** 2 * g.to(wide) * scale).to(g.dtype) for p, g in zip(params, grads)]
    return [(g.to(wide) * scale).to(g.dtype) for g in grads]
