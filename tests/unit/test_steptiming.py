"""The checks on measured step times: a baseline far from the profile's, a hidden fraction that
cannot be right. Plain numbers in, words out."""
from __future__ import annotations

import pytest

from asam_tune.steptiming import BASELINE_DISAGREEMENT, baseline_warning, hidden_fraction_warning


@pytest.mark.parametrize("measured, predicted", [(0.005, 0.005), (0.0099, 0.005), (0.0026, 0.005)])
def test_a_baseline_within_2x_of_the_profile_passes(measured, predicted):
    assert baseline_warning(measured, predicted) is None


def test_the_issues_616_ms_against_5_ms_is_named_with_the_load():
    message = baseline_warning(0.616, 0.005, "SGD", load=(3.1, 2.0, 1.0))
    assert message.startswith("SGD's step measured 616 ms here, the profile predicts 5 ms (123.20x)")
    assert "busier now than when it was profiled (1-minute load average now 3.10)" in message


def test_a_baseline_much_faster_than_the_profile_says_the_profile_was_busy():
    message = baseline_warning(0.001, 0.005 * BASELINE_DISAGREEMENT, "SAM")
    assert message.startswith("SAM's step measured 1 ms") and "profile was measured while the machine was busier" in message


def test_nonsense_inputs_give_no_warning():
    assert baseline_warning(0.0, 0.005) is None and baseline_warning(0.005, 0.0) is None


@pytest.mark.parametrize("hidden, expected", [(None, None), (0.0, None), (0.5, None), (1.0, None),
                                              (-0.65, "hidden fraction -0.65 < 0"), (1.3, "hidden fraction 1.30 > 1")])
def test_a_hidden_fraction_outside_0_1_is_named(hidden, expected):
    message = hidden_fraction_warning(hidden)
    assert message == expected if expected is None else message.startswith(expected)
