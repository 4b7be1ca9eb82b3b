"""The gain table, the floor's b_p and the named rho rules (asam_tune.costmodel.quality)."""
from __future__ import annotations

import math

import pytest

from asam_tune.costmodel.quality import (
    DEFAULT_FLOORS, DEFAULT_RHO_RULE, GAIN_TABLES, GainTable, expected_gain, floor_batch, gain_text, resolve_floor,
    rho_rule_named,
)
from asam_tune.errors import UserInputError
from asam_tune.records import NO_RHO_RULE, RhoRule

TABLE = GainTable(fractions=(1.0, 0.25, 0.0625), gains=(1.0, 0.9, 0.5), source="by hand")


@pytest.mark.parametrize("fraction, value, bound", [
    (1.0, 1.0, "estimate"),
    (0.25, 0.9, "estimate"),
    (0.5, 0.95, "estimate"),  # halfway between 1 and 1/4 in log(b_p/B)
    (0.125, 0.7, "estimate"),  # halfway between 1/4 and 1/16
    (0.01, 0.5, "at_most"),  # below the smallest measured: at most what was measured there
])
def test_gain_is_linear_in_log_fraction_between_measurements(fraction, value, bound):
    gain = TABLE.at(fraction)
    assert (gain.value, gain.bound, gain.perturbation_fraction) == (pytest.approx(value), bound, fraction)


def test_bad_tables_and_fractions():
    with pytest.raises(ValueError, match="descending"):
        GainTable(fractions=(0.25, 1.0), gains=(0.9, 1.0), source="")
    with pytest.raises(ValueError, match="one gain per fraction"):
        GainTable(fractions=(1.0,), gains=(), source="")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        TABLE.at(0.0)


def test_the_shipped_tables_and_floors_agree():
    """Each default floor is the smallest measured fraction of its rule's table whose gain is >= 0.9."""
    for kind, (floor, source) in DEFAULT_FLOORS.items():
        table = GAIN_TABLES[kind]
        keeping = [f for f, g in zip(table.fractions, table.gains) if g >= 0.9]
        assert floor == min(keeping), kind
        assert "provisional" not in source and "provisional" not in table.source
    # The default rule's numbers name the measurement they came from.
    measured = "docs/results/peers-rho/rho.json"
    assert measured in DEFAULT_FLOORS["power"][1] and measured in GAIN_TABLES["power"].source
    assert DEFAULT_RHO_RULE.kind == "power" and measured in DEFAULT_RHO_RULE.source


@pytest.mark.parametrize("fraction, batch, expected", [(0.25, 100, 25), (0.25, 10, 3), (0.1, 30, 3), (0.001, 64, 1),
                                                       (1.0, 128, 128)])
def test_floor_batch_rounds_up_without_float_error(fraction, batch, expected):
    assert floor_batch(fraction, batch) == expected == max(1, math.ceil(round(fraction * batch, 9)))


def test_resolve_floor():
    assert resolve_floor(None, DEFAULT_RHO_RULE, 100).batch == 1
    assert resolve_floor("default", NO_RHO_RULE, 100).batch == 100
    assert resolve_floor(0.3, DEFAULT_RHO_RULE, 100).batch == 30
    with pytest.raises(UserInputError, match="min_perturbation_fraction"):
        resolve_floor(0, DEFAULT_RHO_RULE, 100)


def test_named_rules_and_gain_text():
    assert rho_rule_named("default") == DEFAULT_RHO_RULE and rho_rule_named("none") == NO_RHO_RULE
    custom = RhoRule(kind="power", exponent=0.5, max_factor=4.0, source="mine")
    assert rho_rule_named(custom) is custom
    table = GAIN_TABLES["power"]
    assert gain_text(expected_gain(100, 100, DEFAULT_RHO_RULE)) == f"{table.gains[0]:.0%}"
    below = expected_gain(1, 1000, DEFAULT_RHO_RULE)  # below the smallest measured fraction
    assert (below.value, below.bound) == (table.gains[-1], "at_most")
    assert gain_text(below) == f"at most {table.gains[-1]:.0%}"
    assert expected_gain(50, 100, NO_RHO_RULE).value == pytest.approx(0.69)
