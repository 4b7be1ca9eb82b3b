"""What the plan keeps of SAM's accuracy: the rho rule, the quality floor on b_p / B, and the gain
expected at a b_p / B, from measurements kept here as constants (no torch).

The rho rule itself is ``records.rho_rule.DEFAULT_RHO_RULE`` (the runtime reads it too). The
constants below are the one place the gains and floors live: the planner, the plan's defaults and
the documentation's worked example read them from here. Those for the default rule are measured
by ``python -m asam_tune.bench.peers_rho`` (docs/peers.md); each carries its source, and the plan
records that source beside the numbers it used.

"Gain" is the share of SAM's test-accuracy gain over SGD that asynchronous SAM keeps at
``b_p / B``: ``(acc - acc_SGD) / (acc_SAM - acc_SGD)``. The floor is the smallest ``b_p / B``
whose measured gain stays within 10 % of SAM's (gain >= 0.9).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from asam_tune.errors import UserInputError
from asam_tune.records.plan import ExpectedGain, Quality
from asam_tune.records.rho_rule import DEFAULT_RHO_RULE, NO_RHO_RULE, RhoRule, RhoRuleKind

_MNIST1D = "MNIST-1D with 30% label noise, 60 epochs, the project's CNN and schedule, in-process"

@dataclass(frozen=True)
class GainTable:
    """Measured gain at a few ``b_p / B`` fractions (descending), for one kind of rho rule."""

    fractions: tuple[float, ...]
    gains: tuple[float, ...]
    source: str

    def __post_init__(self) -> None:
        if len(self.fractions) != len(self.gains) or not self.fractions:
            raise ValueError("a gain table needs one gain per fraction")
        if list(self.fractions) != sorted(self.fractions, reverse=True) or len(set(self.fractions)) != len(self.fractions):
            raise ValueError("a gain table's fractions must be distinct and descending")

    def at(self, fraction: float) -> ExpectedGain:
        """The gain at ``fraction``: linear in log(fraction) between measured fractions; below the
        smallest measured one, at most the gain measured there (a smaller ascent batch is no
        better); above the largest, the gain measured there."""
        if not 0 < fraction <= 1:
            raise ValueError(f"b_p / B must be in (0, 1], got {fraction!r}")
        rounded = round(fraction, 6)
        ascending_fractions = self.fractions[::-1]
        ascending_gains = self.gains[::-1]
        if fraction < ascending_fractions[0]:
            return ExpectedGain(perturbation_fraction=rounded, value=ascending_gains[0], bound="at_most")
        if fraction >= ascending_fractions[-1]:
            return ExpectedGain(perturbation_fraction=rounded, value=ascending_gains[-1], bound="estimate")
        right = bisect.bisect_left(ascending_fractions, fraction)
        if ascending_fractions[right] == fraction:
            return ExpectedGain(perturbation_fraction=rounded, value=ascending_gains[right], bound="estimate")
        f0, f1 = ascending_fractions[right - 1], ascending_fractions[right]
        g0, g1 = ascending_gains[right - 1], ascending_gains[right]
        share = (math.log(fraction) - math.log(f0)) / (math.log(f1) - math.log(f0))
        return ExpectedGain(perturbation_fraction=rounded, value=round(g0 + (g1 - g0) * share, 4), bound="estimate")


_PEERS = ("python -m asam_tune.bench.peers_rho on mnist1d-cnn (MNIST-1D, 30% label noise, 60 epochs, the "
          "project's CNN) and seq-transformer (generated sequences, 30% label noise, 40 epochs, a 2-layer "
          "transformer), 3 seeds each, SAM at its best rho on a validation split: docs/results/peers-rho/rho.json, "
          "commit 827c047, 2026-12-01")

# Gain at b_p / B. With the default rule: asynchronous SAM at the rule's rho for each b_p, the
# smaller of the two workloads' gains (mnist1d-cnn, seq-transformer): b_p/B = 1: 0.62, 1.00;
# 1/4: 1.05, 0.97; 6/100: 1.07, 0.98; 3/100: 1.05, 0.94. At b_p = B (staleness 1, SAM's rho)
# mnist1d-cnn kept less than at the smaller b_p with their larger rho.
# Without a rule: the first MNIST-1D measurements, rho fixed at 0.3 for every method (SGD 69.5 %,
# SAM 84.5 %, not at its best rho): b_p/B = 1: 86.6, 1/2: 79.8, 1/4: 75.5, 1/8: 73.4, 1/16: 74.0,
# 1/33: 74.0 (3 seeds each); the peers benchmark did not re-measure them.
GAIN_TABLES: dict[RhoRuleKind, GainTable] = {
    "power": GainTable(
        fractions=(1.0, 0.25, 0.06, 0.03), gains=(0.62, 0.97, 0.98, 0.94),
        source=f"measured with the default rule, the smaller gain of two workloads: {_PEERS}"),
    "none": GainTable(
        fractions=(1.0, 0.5, 0.25, 0.125, 0.0625, 0.03), gains=(1.14, 0.69, 0.40, 0.26, 0.30, 0.30),
        source=f"first {_MNIST1D} measurements with rho 0.3 at every b_p (3 seeds each), against "
               f"SGD 69.5% and SAM 84.5% (not re-measured by the peers benchmark)"),
}

# The default floor for each kind of rule: the smallest measured b_p/B within 10 % of SAM's gain.
DEFAULT_FLOORS: dict[RhoRuleKind, tuple[float, str]] = {
    "power": (0.03, f"measured: b_p/B = 0.03, the smallest measured, kept >= 90% of SAM's gain on both "
                    f"workloads with the default rule (the floor lies at or below it): {_PEERS}"),
    "none": (1.0, f"with rho fixed no b_p/B below 1 was measured to keep >= 90% of SAM's gain "
                  f"({_MNIST1D}, rho 0.3: 69% at 1/2)"),
}

USER_FLOOR_SOURCE = "given by the user (--min-perturbation-fraction)"
NO_FLOOR_SOURCE = "no floor asked for: b_p is as large as hides fully, however small"


def rho_rule_named(name: str | RhoRule) -> RhoRule:
    """'default' (the measured rule above), 'none', or a RhoRule as it is."""
    if isinstance(name, RhoRule):
        return name
    if name == "default":
        return DEFAULT_RHO_RULE
    if name == "none":
        return NO_RHO_RULE
    raise UserInputError(f"Invalid rho rule: {name!r} (choose default or none)")


@dataclass(frozen=True)
class Floor:
    """The floor a plan keeps: ``fraction`` None is no floor (``batch`` 1)."""

    fraction: float | None
    batch: int
    source: str


def floor_batch(fraction: float, batch_size: int) -> int:
    """The smallest b_p with b_p / B >= fraction (rounding the product's float error away)."""
    return max(1, min(batch_size, math.ceil(fraction * batch_size - 1e-9)))


def resolve_floor(fraction: float | None | str, rule: RhoRule, batch_size: int) -> Floor:
    """``fraction``: "default" (the rule's measured floor), None (no floor) or a number in (0, 1]."""
    if fraction is None:
        return Floor(None, 1, NO_FLOOR_SOURCE)
    if fraction == "default":
        value, source = DEFAULT_FLOORS[rule.kind]
        return Floor(value, floor_batch(value, batch_size), source)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise UserInputError(f"Invalid min_perturbation_fraction: {fraction!r} (a fraction in (0, 1])")
    return Floor(float(fraction), floor_batch(float(fraction), batch_size), USER_FLOOR_SOURCE)


def expected_gain(perturbation_batch_size: int, batch_size: int, rule: RhoRule) -> ExpectedGain:
    """The gain expected at ``b_p`` of ``B`` under ``rule`` (``GAIN_TABLES``)."""
    return GAIN_TABLES[rule.kind].at(perturbation_batch_size / batch_size)


def quality(floor: Floor, perturbation_batch_size: int, batch_size: int, rule: RhoRule) -> Quality:
    return Quality(min_perturbation_fraction=floor.fraction, min_perturbation_batch_size=floor.batch,
                   floor_source=floor.source, expected_gain=expected_gain(perturbation_batch_size, batch_size, rule),
                   gain_source=GAIN_TABLES[rule.kind].source)


def gain_text(gain: ExpectedGain) -> str:
    """'95%', 'at most 89%' or 'unknown'."""
    if gain.value is None:
        return "unknown"
    text = f"{gain.value:.0%}"
    return f"at most {text}" if gain.bound == "at_most" else text


def measured_choice_update(plan, perturbation_batch_size: int, notes: tuple[str, ...]) -> dict:
    """The version-2 fields of a plan whose b_p was chosen by measurement and hides fully
    (``asam-tune tune``): hiding full, the gain at the new b_p, no cost-model trade; a note when
    the new b_p is below the floor. Nothing for a version-1 plan."""
    if plan.schema_version == 1 or plan.quality is None:
        return {"notes": notes}
    q = plan.quality
    gain = expected_gain(perturbation_batch_size, plan.batch_size, plan.rho_rule)
    if perturbation_batch_size < q.min_perturbation_batch_size:
        notes = notes + (f"b_p={perturbation_batch_size} is below the quality floor of the source plan "
                         f"(b_p >= {q.min_perturbation_batch_size}): expected gain {gain_text(gain)} of SAM's",)
    return {"hiding": "full", "trade": None, "notes": notes,
            "quality": q.model_copy(update={"expected_gain": gain})}
