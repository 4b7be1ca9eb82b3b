"""How rho follows the perturbation batch size ``b_p`` (no torch).

A smaller ascent batch gives a noisier ascent direction, and the rho that keeps SAM's gain grows
as ``b_p`` shrinks. The user's ``rho`` means "rho at the full batch" (``b_p = B``); the rule
gives the rho applied at a smaller ``b_p``::

    rho(b_p) = rho * min(max_factor, (B / b_p) ** exponent)        kind "power"
    rho(b_p) = rho                                                  kind "none"

The planner records the rule in the plan; the runtime applies it to every job, also after the
online adapter changed ``b_p``. ``source`` says where the numbers came from.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, NonNegativeFloat

from asam_tune.records.base import Record

RhoRuleKind = Literal["none", "power"]


class RhoRule(Record):
    """rho as a function of ``b_p / B``; see the module docstring."""

    kind: RhoRuleKind
    exponent: NonNegativeFloat = 0.0
    max_factor: float = Field(default=1.0, ge=1.0)
    source: str = ""

    def factor(self, perturbation_batch_size: int, batch_size: int) -> float:
        """The multiplier applied to the full-batch rho at ``b_p`` of ``B``."""
        if perturbation_batch_size < 1 or batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got b_p={perturbation_batch_size!r}, B={batch_size!r}")
        if self.kind == "none" or perturbation_batch_size >= batch_size:
            return 1.0
        return min(self.max_factor, (batch_size / perturbation_batch_size) ** self.exponent)

    def rho_for(self, rho: float, perturbation_batch_size: int, batch_size: int) -> float:
        """The rho to apply at ``b_p`` of ``B``, for the full-batch ``rho``."""
        return rho * self.factor(perturbation_batch_size, batch_size)


NO_RHO_RULE = RhoRule(kind="none", source="rho_rule='none': rho stays the same at every b_p")

# The rule the runtime and the planner apply unless told otherwise; the one place its numbers
# live (costmodel/quality.py keeps the gains and floors measured with it). Fitted in log rho to
# the best rho on the validation split at b_p/B = 1 .. 1/32 on two workloads, relative to SAM's
# own best rho (12 points, rmse 0.149 in log rho). The fit found no cap; max_factor is the
# factor at b_p = 3 of 100, the smallest b_p checked, so the rule does not extrapolate.
DEFAULT_RHO_RULE = RhoRule(
    kind="power", exponent=0.205, max_factor=2.05,
    source="measured: python -m asam_tune.bench.peers_rho, pooled fit on mnist1d-cnn and seq-transformer "
           "(validation split; docs/results/peers-rho/rho.json, commit 827c047, 2026-12-01)")
