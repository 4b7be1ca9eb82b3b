"""The peers benchmark's bookkeeping: method names, the rho walk, the rule fit, costs, the ranking."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest

from asam_tune.bench.peers_cost import budget_cost, hidden_samples
from asam_tune.bench.peers_methods import parse_method, samples
from asam_tune.bench.peers_remedies import rank
from asam_tune.bench.peers_rho import fit, rule_rho
from asam_tune.bench.peers_select import best_rho_estimate, walk
from asam_tune.bench.peers_summary import epochs_to_reach
from asam_tune.errors import UserInputError


def test_method_names_parse_to_what_they_say():
    m = parse_method("asam-1/32")
    assert (m.kind, m.fraction, m.perturbation_batch_size(100), m.asynchronous) == ("asam", Fraction(1, 32), 3, True)
    assert parse_method("sync-1/16").perturbation_batch_size(100) == 6
    nb = parse_method("nonblocking-1-beta1/32")
    assert (nb.fraction, nb.beta) == (1, Fraction(1, 32))
    split = parse_method("split-1/32+1/8")
    assert split.perturbation_batch_size(100) == 3 and split.main_ascent_samples(100) == 12
    assert split.ascent_fraction() == Fraction(1, 32) + Fraction(1, 8)
    assert parse_method("looksam-k5").k == 5 and parse_method("rst-0.5").probability == 0.5
    assert parse_method("sgd").has_rho is False and parse_method("mesa").has_rho is True
    assert parse_method("sam").perturbation_batch_size(100) == 100


@pytest.mark.parametrize("bad", ["asam", "asam-0", "asam-3/2", "looksam-k0", "rst-2", "adam", "sync-1/0x"])
def test_unknown_or_out_of_range_methods_are_one_line_errors(bad):
    with pytest.raises(UserInputError) as info:
        parse_method(bad)
    assert "\n" not in str(info.value)


def test_samples_round_and_stay_within_the_batch():
    assert samples(Fraction(1, 1000), 100) == 1
    assert samples(Fraction(1), 100) == 100
    assert samples(Fraction(1, 8), 100) == 12


def test_walk_extends_past_an_edge_and_stops_at_the_peak():
    ladder = (0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.25)
    tried = []

    def score(rho):
        tried.append(rho)
        return -abs(math.log(rho / 0.8))

    best, scores = walk(ladder, 0.3, score)
    assert best == 0.8
    assert set(scores) == {0.2, 0.3, 0.45, 0.6, 0.8, 1.0} and len(tried) == len(set(tried))


def test_walk_gives_up_after_the_allowed_extensions():
    best, scores = walk((1, 2, 3, 4, 5, 6, 7, 8), 2, lambda rho: rho, max_extensions=2)
    assert best == 5 and max(scores) == 5


def test_best_rho_estimate_finds_the_vertex_and_flags_edges():
    peak = 0.5
    scores = {r: -(math.log(r) - math.log(peak)) ** 2 for r in (0.3, 0.45, 0.6)}
    estimate = best_rho_estimate(scores)
    assert estimate["rho"] == pytest.approx(peak, rel=1e-6) and not estimate["at_edge"]
    assert best_rho_estimate({0.1: 0.5, 0.2: 0.6, 0.3: 0.7}) == {"rho": 0.3, "at_edge": True, "method": "best tried"}


def _points(exponent, cap, fractions=(1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32)):
    return [{"workload": "w", "fraction": f, "factor": min(cap, (1 / f) ** exponent), "at_edge": False}
            for f in fractions]


def test_fit_recovers_a_known_power_law_and_cap():
    result = fit(_points(0.3, 2.0))
    rule = result["power_with_cap"]
    assert rule["exponent"] == pytest.approx(0.3, abs=0.01)
    assert rule["max_factor"] == pytest.approx(2.0, rel=0.05)
    assert rule["rmse_log"] < 0.02 < result["none"]["rmse_log"]
    assert result["power"]["rmse_log"] > rule["rmse_log"]


def test_fit_needs_two_points_off_the_edges():
    points = _points(0.3, 10.0, fractions=(1 / 2, 1 / 4))
    points[0]["at_edge"] = True
    with pytest.raises(UserInputError, match="cannot fit"):
        fit(points)


def test_rule_rho_applies_exponent_and_cap():
    rule = {"exponent": 0.5, "max_factor": 3.0}
    assert rule_rho(rule, 0.4, 1.0) == 0.4
    assert rule_rho(rule, 0.4, 1 / 4) == 0.8
    assert rule_rho(rule, 0.4, 1 / 100) == 1.2  # capped at 3x


def test_budget_costs():
    phi = 0.9
    beta = Fraction(1, 32)
    assert budget_cost(parse_method("sgd"), 100, beta, phi) == 1.0
    assert budget_cost(parse_method("sam"), 100, beta, phi) == pytest.approx(1.9)
    assert budget_cost(parse_method("asam-1/32"), 100, beta, phi) == 1.0  # 3 samples hide
    assert budget_cost(parse_method("asam-1/4"), 100, beta, phi) == pytest.approx(8.0)  # partial hiding
    assert budget_cost(parse_method("looksam-k5"), 100, beta, phi) == pytest.approx(1.18)
    assert budget_cost(parse_method("sync-1/16"), 100, beta, phi) == pytest.approx(1.054)
    assert budget_cost(parse_method("split-1/32+1/8"), 100, beta, phi) == pytest.approx(1.108)
    assert hidden_samples(100, Fraction(1, 30)) == 3


def test_ranking_puts_cheapest_gain_keeper_first_and_marks_pareto():
    rows = [{"candidate": n, "gain_fraction": g, "cost": c}
            for n, g, c in (("sam", 1.0, 2.0), ("cheap", 0.95, 1.1), ("weak", 0.3, 1.0), ("bad", 0.2, 1.5))]
    ordered = rank(rows)
    assert [r["candidate"] for r in ordered] == ["cheap", "sam", "weak", "bad"]
    pareto = {r["candidate"] for r in ordered if r["pareto"]}
    assert pareto == {"sam", "cheap", "weak"}


def test_epochs_to_reach():
    assert epochs_to_reach([0.1, 0.5, 0.7, 0.6], 0.6) == 3
    assert epochs_to_reach([0.1, 0.2], 0.6) is None


def test_gain_table_takes_the_smaller_gain_of_the_workloads_at_common_fractions():
    from asam_tune.bench.peers_rho import gain_table

    checks = [{"workload": "a", "rows": [{"fraction": 1.0, "gain_fraction": 0.8}, {"fraction": 0.25, "gain_fraction": 1.1},
                                         {"fraction": 0.01, "gain_fraction": 0.5}]},
              {"workload": "b", "rows": [{"fraction": 1.0, "gain_fraction": 1.0}, {"fraction": 0.25, "gain_fraction": 0.95}]}]
    table = gain_table(checks)
    assert [(g["fraction"], g["gain"]) for g in table] == [(1.0, 0.8), (0.25, 0.95)]
    assert table[1]["by_workload"] == {"a": 1.1, "b": 0.95}
    assert gain_table([]) == []


def test_extra_fractions_apply_to_every_workload_or_the_one_named():
    from asam_tune.bench.peers_rho import extra_for

    text = "1/50, mnist1d-cnn:1/100"
    assert extra_for(text, "mnist1d-cnn") == ("1/50", "1/100")
    assert extra_for(text, "seq-transformer") == ("1/50",)
    assert extra_for("", "x") == ()


def test_targets_compare_with_looksam_in_modelled_steps_and_say_the_measured_ratio():
    from fractions import Fraction

    from asam_tune.bench.peers_remedies import targets

    curve_async, curve_look = [0.70, 0.80, 0.86], [0.60, 0.75, 0.86]
    rows = {"sgd": {"kind": "sgd", "test_mean": 0.68, "step_time_median_s": 0.01},
            "asam-1/32": {"kind": "asam", "perturbation_batch_size": 3, "test_mean": 0.86, "test_curve_mean": curve_async},
            "looksam-k5": {"kind": "looksam", "test_mean": 0.86, "test_curve_mean": curve_look,
                           "step_time_median_s": 0.005}}
    result = {"batch_size": 100, "forward_backward_share": 1.0, "steps_per_epoch": 10, "methods": rows,
              "sgd_test_mean": 0.68, "sam_test_mean": 0.86}
    check = {"rows": [{"b_p": 3, "rule_rho": 0.9, "test_mean": 0.86, "test_sd": 0.01, "gain_fraction": 1.0}]}
    t = targets(result, check, Fraction(1, 30), None)
    assert (t["chosen_b_p"], t["modelled_cost"], t["reaches"], t["cheaper_than_sam"]) == (3, 1.0, True, True)  # b_p 3 < 100/30: hidden
    look = t["looksam"]["looksam-k5"]
    # Asynchronous SAM reaches 86 % in epoch 3 at cost 1.0; LookSAM in epoch 3 at 1 + 1/5.
    assert look["async_sgd_steps_to_level"] == pytest.approx(30) and look["looksam_sgd_steps_to_level"] == pytest.approx(36)
    assert look["cheaper"] and look["looksam_measured_step_ratio"] == 0.5 and not look["cheaper_than_measured"]
