"""The methods the peers benchmark compares, by name, and how each takes one training step.

Names (``parse_method``); ``f`` is a fraction of the batch written ``1``, ``1/4``, ``3/32``...:

- ``sgd``: the base optimizer alone.
- ``sam``: ``AsyncSAM(staleness=0)``, the ascent on the whole batch (synchronous SAM).
- ``po-sam``: pytorch_optimizer's ``SAM`` (the external reference).
- ``looksam-k5``, ``looksam-k10``: pytorch_optimizer's ``LookSAM``, a full SAM step every k steps;
  ``looksam-k5-a0.3``: with the reused direction weighted 0.3 instead of the default 0.7 (on the
  transformer task the default never learns: each reused step adds 0.7 of the gradient's norm).
- ``asam-f``: asynchronous SAM (``AsyncSAM(staleness=1)``), the ascent on ``b_p = f * B`` samples
  of the next batch at the previous weights. In-process (the same math as a worker process).
- ``sync-f``: synchronous SAM whose ascent uses the first ``f * B`` samples of the current batch.
- ``nonblocking-f-betaG``: ``AsyncSAM(staleness="non_blocking")`` with ``b_p = f * B`` and a
  worker that processes ``G * B`` samples per main step (``peers_steppers.SlowWorker``): a job
  takes ``ceil(f / G)`` main steps and the main step never waits.
- ``split-f+h``: the ascent on ``f * B`` samples of the next batch by the worker (stale) plus
  ``h * B`` samples of the current batch on the main device (fresh), pooled.
- ``mesa``: MESA (Du et al. 2022): one backward, plus a distillation term toward an exponential
  moving average of the weights (one extra forward); the swept strength is its lambda.
- ``rst-p``: randomized sharpness-aware training (Zhao et al. 2022): each step is a SAM step
  with probability ``p``, else a base-optimizer step.

Every method with a strength hyper-parameter calls it ``rho`` here (MESA's lambda included).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from asam_tune.errors import UserInputError

_FRACTION = r"(\d+(?:/\d+)?)"
_PATTERNS = {
    "asam": re.compile(rf"asam-{_FRACTION}"),
    "sync": re.compile(rf"sync-{_FRACTION}"),
    "nonblocking": re.compile(rf"nonblocking-{_FRACTION}-beta{_FRACTION}"),
    "split": re.compile(rf"split-{_FRACTION}\+{_FRACTION}"),
    "looksam": re.compile(r"looksam-k(\d+)(?:-a(0\.\d+|1(?:\.0+)?))?"),
    "rst": re.compile(r"rst-(0\.\d+|1(?:\.0+)?)"),
}
_PLAIN = ("sgd", "sam", "po-sam", "mesa")
NEEDS_EXTRA = {"po-sam": "peers", "looksam": "peers"}


@dataclass(frozen=True)
class Method:
    name: str  # canonical, as parsed
    kind: str  # sgd, sam, po-sam, looksam, asam, sync, nonblocking, split, mesa, rst
    fraction: Fraction | None = None  # b_p / B (the worker's share for split)
    main_fraction: Fraction | None = None  # split: the main device's share of the ascent
    beta: Fraction | None = None  # nonblocking: the worker's samples per main step, over B
    k: int | None = None  # looksam
    alpha: float | None = None  # looksam: weight of the reused direction (None: pytorch_optimizer's 0.7)
    probability: float | None = None  # rst

    @property
    def has_rho(self) -> bool:
        return self.kind != "sgd"

    @property
    def asynchronous(self) -> bool:
        """The ascent comes from a worker beside the main step (what a real worker could time)."""
        return self.kind in ("asam", "nonblocking", "split")

    def perturbation_batch_size(self, batch_size: int) -> int | None:
        """Samples the worker's (or the synchronous) ascent uses; None when not applicable."""
        if self.kind in ("sam", "po-sam", "looksam", "rst"):
            return batch_size
        if self.fraction is None:
            return None
        return samples(self.fraction, batch_size)

    def main_ascent_samples(self, batch_size: int) -> int:
        return 0 if self.main_fraction is None else samples(self.main_fraction, batch_size)

    def ascent_fraction(self) -> Fraction:
        """The share of the batch the ascent gradient is computed on, worker and main together."""
        if self.kind in ("sam", "po-sam", "looksam", "rst"):
            return Fraction(1)
        if self.kind in ("sgd", "mesa"):
            return Fraction(0)
        return (self.fraction or 0) + (self.main_fraction or 0)


def samples(fraction: Fraction, batch_size: int) -> int:
    """``fraction * B`` rounded, at least 1 and at most B."""
    return max(1, min(batch_size, round(fraction * batch_size)))


def _fraction(text: str, name: str) -> Fraction:
    value = Fraction(text)
    if not 0 < value <= 1:
        raise UserInputError(f"method {name!r}: the fraction {text} must be in (0, 1]")
    return value


def parse_method(name: str) -> Method:
    """A ``Method`` from its name (see the module docstring); a clear error for anything else."""
    text = str(name).strip()
    if text in _PLAIN:
        return Method(text, text)
    for kind, pattern in _PATTERNS.items():
        match = pattern.fullmatch(text)
        if not match:
            continue
        if kind == "looksam":
            k = int(match.group(1))
            if k < 1:
                raise UserInputError(f"method {text!r}: k must be >= 1")
            alpha = None if match.group(2) is None else float(match.group(2))
            if alpha is not None and not 0 < alpha < 1:
                raise UserInputError(f"method {text!r}: alpha must be in (0, 1)")
            return Method(text, kind, k=k, alpha=alpha)
        if kind == "rst":
            return Method(text, kind, probability=float(match.group(1)))
        if kind == "nonblocking":
            return Method(text, kind, fraction=_fraction(match.group(1), text),
                          beta=_fraction(match.group(2), text))
        if kind == "split":
            return Method(text, kind, fraction=_fraction(match.group(1), text),
                          main_fraction=_fraction(match.group(2), text))
        return Method(text, kind, fraction=_fraction(match.group(1), text))
    raise UserInputError(
        f"unknown method {text!r}: expected sgd, sam, po-sam, mesa, looksam-kK[-aALPHA], asam-F, sync-F, "
        "nonblocking-F-betaG, split-F+G or rst-P (F, G fractions of the batch such as 1/4)")


__all__ = ["Method", "parse_method", "samples", "NEEDS_EXTRA"]
