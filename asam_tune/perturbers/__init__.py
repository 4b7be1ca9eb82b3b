"""The perturbers: what computes SAM's ascent perturbation, behind one small interface.

A layer below the stages: the runtime (``AsyncSAM``) drives them, and the profiler measures
the per-step handover to a real one. It imports neither. Modules:

  base           the ``Perturber`` protocol, jobs, results, shared bookkeeping
  ascent         the SAM math (plain and adaptive), the perturbed set, per-job seeds
  weights        keep / perturb / restore the main model's weights
  batches        any batch structure: the slicing rule, a flat form for shared memory
  state_sync     what of the model besides the weights a replica must follow
  in_process     synchronous, on the main model itself (the reference and the fallback)
  process_parent a CPU worker process (``process_child`` is its side, ``process_lifecycle``
                 its start and stop, ``copy_stream`` its handover from GPU weights);
                 shared_memory, layout
  stream         a second CUDA stream or another GPU
  fake           scripted failures, for tests

Importing the package imports no torch (the CPU worker's boot module lives here).
"""
from __future__ import annotations

_EXPORTS = {
    "AscentJob": "base", "AscentTask": "base", "PerturbationResult": "base", "Perturber": "base",
    "InProcessPerturber": "in_process", "ProcessPerturber": "process_parent", "StreamPerturber": "stream",
    "FakePerturber": "fake",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'asam_tune.perturbers' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"asam_tune.perturbers.{module}"), name)
