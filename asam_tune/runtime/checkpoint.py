"""``AsyncSAM``'s state: what a bit-exact resume needs, in plain values and tensors.

Checkpoints: ``{"model": model.state_dict(), "sam": sam.state_dict()}`` between steps (after
``finish_step()``). The state holds the base optimizer's state, the step counter, the
perturbations already computed for coming steps, rho, the mode, the seed of the ascent's random
draws (so dropout in the ascent repeats after a resume), the statistics and the adapter. It
loads with ``torch.load(..., weights_only=True)``. The caller's own random state (dropout in
the descent, data order) stays the caller's to save.
"""
from __future__ import annotations

from typing import Any

from asam_tune.errors import UserInputError
from asam_tune.perturbers.base import PerturbationResult
from asam_tune.runtime.adaptation import BatchSizeAdapter

__all__ = ["STATE_FORMAT", "load_into", "state_of"]

# 2: the ascent's seed added. Format 1 states still load (the seed stays this object's).
STATE_FORMAT = 2
_READABLE = (1, 2)


def state_of(sam: Any) -> dict[str, Any]:
    pending = [
        {"serves_step": target, "weights_step": result.step,
         "perturbation": None if result.perturbation is None else [t.clone() for t in result.perturbation],
         "compute_time_s": float(result.compute_time_s)}
        for target, result in sorted(sam._schedule.held.items())  # pruned: all still usable
    ]
    return {
        "format": STATE_FORMAT,
        "base_optimizer": sam.base_optimizer.state_dict(),
        "step": sam._step,
        "rho": sam.rho,
        "staleness": sam._configured_staleness,
        "perturbation_batch_size": sam.perturbation_batch_size,
        "seed": sam.seed,
        "pending": pending,
        "stats": sam._stats.state_dict(),
        "adapter": None if sam._feed is None else sam._feed.state_dict(),
    }


def _result_from_state(sam: Any, entry: dict[str, Any]) -> PerturbationResult:
    try:
        tensors = entry["perturbation"]
        result = PerturbationResult(int(entry["weights_step"]), None, float(entry["compute_time_s"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserInputError(f"invalid pending perturbation in AsyncSAM state: {exc!r}") from None
    if tensors is None:
        return result
    shapes = [tuple(p.shape) for p in sam._params]
    if not isinstance(tensors, (list, tuple)) or [tuple(getattr(t, "shape", ())) for t in tensors] != shapes:
        raise UserInputError(f"pending perturbation in AsyncSAM state does not match the model's "
                             f"{len(shapes)} perturbed parameters")
    result.perturbation = [t.to(device=p.device, dtype=p.dtype) for t, p in zip(tensors, sam._params)]
    return result


def load_into(sam: Any, state: dict[str, Any]) -> None:
    """Restore ``state_of``'s output into ``sam``; rho must match. With adaptation on, the
    checkpoint's adapter (and its ``b_p``) comes back; with it off, this object's ``b_p`` stays."""
    if not isinstance(state, dict) or state.get("format") not in _READABLE:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise UserInputError(f"not an AsyncSAM state (format {' or '.join(map(str, _READABLE))} expected), "
                             f"got format {found!r}")
    if state.get("rho") != sam.rho:
        raise UserInputError(f"checkpoint rho {state.get('rho')!r} != this AsyncSAM's rho {sam.rho!r}")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UserInputError(f"Invalid step in AsyncSAM state: {step!r}")
    seed = state.get("seed", sam.seed)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserInputError(f"Invalid seed in AsyncSAM state: {seed!r}")
    try:
        held = {int(entry["serves_step"]): _result_from_state(sam, entry) for entry in state["pending"]}
        optimizer_state, stats_state = state["base_optimizer"], state["stats"]
    except (KeyError, TypeError, ValueError) as exc:
        raise UserInputError(f"incomplete AsyncSAM state: {exc!r}") from None
    if sam._feed is not None and state.get("adapter") is not None:
        BatchSizeAdapter(1, 1).load_state_dict(state["adapter"])  # refuse a bad one before changing anything
    if sam._schedule.inflight is not None:  # a job for the state being replaced
        sam._collect()
    sam.base_optimizer.load_state_dict(optimizer_state)
    sam._stats.load_state_dict(stats_state)
    sam._step, sam.seed = step, seed
    sam._schedule.clear()
    if sam._worker.perturber is not None:
        sam._schedule.held.update(held)
    if sam._feed is not None:
        batch_size = sam._feed.load_state_dict(state.get("adapter"))
        if batch_size is not None:
            sam.perturbation_batch_size = batch_size
