"""The trade between hiding the ascent and keeping SAM's gain (no torch).

Hiding the ascent fully makes b_p as large as the perturbation device finishes within one main
step; on a machine whose worker is much slower than its main device that is a few samples, and
a small ascent batch loses most of SAM's accuracy gain (docs/cost-model.md). The quality floor
keeps ``b_p >= ceil(floor x B)``: each candidate runs either its fully hidden b_p when that
reaches the floor, or the floor itself, partially hidden (the main step waits). The planner
then takes the fastest, as it does without a floor.

This module ranks the options, and words the trade for the plan: the fastest plan that hides
fully, the fastest that keeps the floor, which one was chosen and why.
"""
from __future__ import annotations

from asam_tune.costmodel.analysis import Analysis
from asam_tune.costmodel.evaluate import Evaluation, at_least
from asam_tune.costmodel.quality import Floor, expected_gain, gain_text
from asam_tune.records.plan import ExpectedGain, Trade, TradeOption
from asam_tune.records.rho_rule import RhoRule

# Predicted steps closer than this (relative) count as equally fast.
EQUIVALENT_STEP_TIME = 0.03


def rank(evaluations: list[Evaluation]) -> list[Evaluation]:
    """The evaluations, best first: the smallest staleness; among those, the ones within
    ``EQUIVALENT_STEP_TIME`` of the fastest step; among those, the largest b_p, then the fewest
    CPU cores, then the faster step. Repeated on what is left to order the alternatives."""
    remaining = list(evaluations)
    ordered: list[Evaluation] = []
    while remaining:
        staleness = min(e.staleness for e in remaining)
        pool = [e for e in remaining if e.staleness == staleness]
        fastest = min(e.asam_step_s for e in pool)
        band = [e for e in pool if e.asam_step_s <= fastest * (1 + EQUIVALENT_STEP_TIME)]
        best = max(band, key=lambda e: (e.perturbation_batch_size, -e.candidate.total_cores,
                                        -e.asam_step_s, -e.perturbation_time_s))
        ordered.append(best)
        remaining.remove(best)
    return ordered


def floor_options(a: Analysis, floor: Floor) -> list[Evaluation]:
    """Every candidate at ``b_p >= floor.batch`` (fully hidden, or partially at the floor),
    ranked; the candidates whose device cannot hold the floor's b_p are left out."""
    options = [at_least(e, a.models, a.batch_size, floor.batch) for e in a.evaluations]
    return rank([o for o in options if o is not None])


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _option(e: Evaluation, batch_size: int, rule: RhoRule) -> TradeOption:
    return TradeOption(main_device=e.candidate.main.key, perturbation=e.candidate.perturbation.key,
                       perturbation_batch_size=e.perturbation_batch_size, hiding=e.hiding, staleness=e.staleness,
                       asam_step_s=e.asam_step_s, expected_gain=expected_gain_of(e, batch_size, rule))


def hiding_text(e: Evaluation) -> str:
    """How the fastest plan without a floor hides the ascent, for the notes and verdicts."""
    if e.hidden:
        return "hiding the ascent fully"
    return f"hiding the ascent by running it {e.staleness} steps stale (non-blocking)"


def _floor_text(floor: Floor, batch_size: int) -> str:
    return f"b_p >= {floor.batch} of {batch_size} (the quality floor, {floor.fraction:.0%} of B)"


def trade(a: Analysis, floor: Floor, rule: RhoRule, hides_fully: Evaluation | None, keeps_gain: Evaluation | None,
          chosen: Evaluation | None, asynchronous: bool) -> Trade:
    """``chosen`` None: the plan is synchronous SAM."""
    B, sam = a.batch_size, a.base.sam_step_s
    if chosen is None:
        kind = "synchronous"
        if keeps_gain is None and hides_fully is None:
            reason = "no device can compute the ascent beside the main step: synchronous SAM"
        elif floor.fraction is not None and keeps_gain is None:
            reason = f"no perturbation device can hold {_floor_text(floor, B)}: synchronous SAM keeps the gain"
        elif floor.fraction is not None and keeps_gain.partial:
            reason = (f"keeping {_floor_text(floor, B)} costs {_ms(keeps_gain.asam_step_s)} per step, no less than "
                      f"SAM's {_ms(sam)}: synchronous SAM is the honest choice")
        elif floor.fraction is not None:
            reason = (f"the fastest split hides the ascent fully at b_p={keeps_gain.perturbation_batch_size}, above the "
                      f"floor, but costs {_ms(keeps_gain.asam_step_s)} per step, no less than SAM's {_ms(sam)}: "
                      f"synchronous SAM")
        else:
            reason = (f"{hiding_text(hides_fully)} costs {_ms(hides_fully.asam_step_s)} per step, no less than SAM's "
                      f"{_ms(sam)}: synchronous SAM")
    elif floor.fraction is None:
        kind = "hides_fully"
        reason = (f"no quality floor was asked for: the plan hides the ascent at b_p={chosen.perturbation_batch_size}, "
                  f"expected gain {gain_text(expected_gain_of(chosen, B, rule))} of SAM's")
    else:
        kind = "keeps_gain"
        if chosen.hidden:
            reason = f"the fastest split hides the ascent fully and keeps {_floor_text(floor, B)}"
        else:
            reason = (f"{_floor_text(floor, B)} forces partial hiding: {_ms(chosen.asam_step_s)} per step against "
                      f"SAM's {_ms(sam)}")
        if asynchronous and chosen.asam_step_s >= sam:
            reason += "; asynchronous SAM was asked for although synchronous SAM is faster"
    return Trade(hides_fully=None if hides_fully is None else _option(hides_fully, B, rule),
                 keeps_gain=None if keeps_gain is None or floor.fraction is None else _option(keeps_gain, B, rule),
                 chosen=kind, reason=reason)


def floor_notes(a: Analysis, floor: Floor, rule: RhoRule, hides_fully: Evaluation | None,
                chosen: Evaluation | None) -> list[str]:
    """What the floor and the rule did to the plan, in the plan's notes."""
    B, notes = a.batch_size, []
    if floor.fraction is not None:
        notes.append(f"quality floor b_p >= {floor.batch} of {B} ({floor.fraction:.0%} of B): {floor.source}")
    if chosen is not None and chosen.partial:
        wait = max(0.0, chosen.asam_step_s - chosen.main_time_s)
        notes.append(f"the quality floor forces partial hiding: the ascent of b_p={chosen.perturbation_batch_size} "
                     f"takes {_ms(chosen.perturbation_time_s)} (with the handover "
                     f"{_ms(chosen.perturbation_time_s + chosen.candidate.handover.seconds)}) against the main step's "
                     f"{_ms(chosen.main_time_s)}: the main step waits about {_ms(wait)}")
    if (hides_fully is not None and floor.fraction is not None
            and hides_fully.perturbation_batch_size < floor.batch):
        gain = expected_gain_of(hides_fully, B, rule)
        notes.append(f"{hiding_text(hides_fully)} would need b_p={hides_fully.perturbation_batch_size} "
                     f"({hides_fully.perturbation_batch_size / B:.0%} of B) at {_ms(hides_fully.asam_step_s)} per "
                     f"step, expected to keep {gain_text(gain)} of SAM's gain")
    b_p = chosen.perturbation_batch_size if chosen is not None else B
    if rule.kind == "none":
        notes.append("rho stays the same at every b_p (rho_rule none)")
    elif b_p < B:
        notes.append(f"rho follows b_p: the runtime applies rho x {rule.factor(b_p, B):.2f} at b_p={b_p} "
                     f"(rho x min({rule.max_factor:g}, (B/b_p)^{rule.exponent:g}); {rule.source})")
    return notes


def expected_gain_of(chosen: Evaluation | None, batch_size: int, rule: RhoRule) -> ExpectedGain:
    """The gain of an option: synchronous SAM (None) is SAM itself; the gains were measured at
    staleness 1, so an older perturbation (non-blocking) keeps at most as much."""
    if chosen is None:
        return ExpectedGain(perturbation_fraction=1.0, value=1.0, bound="estimate")
    gain = expected_gain(chosen.perturbation_batch_size, batch_size, rule)
    if chosen.staleness > 1 and gain.bound == "estimate":
        return gain.model_copy(update={"bound": "at_most"})
    return gain
