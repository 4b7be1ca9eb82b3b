"""Time curves: affine when the data say so, monotone piecewise otherwise, OOM as a limit."""
from __future__ import annotations

import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asam_tune.costmodel.curves import (
    fit_time_curve, isotonic, least_squares_line, optimizer_step_time_s,
)
from asam_tune.errors import UserInputError
from asam_tune.records import BatchPoint, DeviceProfile
from tests.fixtures.costmodel_profiles import affine, config, measured, points, stats


def test_exact_affine_points_give_the_line():
    curve = fit_time_curve(affine("cpu/4t", 0.002, 0.001))
    assert curve.kind == "affine"
    assert curve.intercept_s == pytest.approx(0.002, rel=1e-12)
    assert curve.slope_s == pytest.approx(0.001, rel=1e-12)
    assert curve.time_s(17) == pytest.approx(0.019, rel=1e-12)
    assert curve.time_s(2000) == pytest.approx(2.002, rel=1e-12)  # the line beyond the data


def test_zero_intercept_rounding_still_counts_as_affine():
    curve = fit_time_curve(affine("cpu/4t", 0.0, 0.0003, batches=(3, 7, 11, 29)))
    assert curve.kind == "affine"
    assert curve.time_s(1) > 0


def test_least_squares_matches_the_standard_library():
    xs, ys = [1, 8, 32, 128], [0.011, 0.0125, 0.0139, 0.025]
    slope, intercept = statistics.linear_regression(xs, ys)
    assert least_squares_line(xs, ys) == pytest.approx((intercept, slope), rel=1e-12)


def test_integer_weights_equal_repeated_points():
    xs, ys, weights = [1, 8, 32, 128], [0.011, 0.0125, 0.0139, 0.025], [3, 1, 2, 1]
    slope, intercept = statistics.linear_regression(
        [x for x, w in zip(xs, weights) for _ in range(w)], [y for y, w in zip(ys, weights) for _ in range(w)])
    assert least_squares_line(xs, ys, [float(w) for w in weights]) == pytest.approx((intercept, slope), rel=1e-12)


def test_gpu_like_plateau_is_piecewise_through_the_medians():
    # Launch-bound up to 32, then linear: no line explains both within 5%.
    times = {1: 0.010, 8: 0.010, 32: 0.0102, 128: 0.030, 512: 0.110}
    curve = fit_time_curve(measured("cuda:0", times))
    assert curve.kind == "piecewise"
    for batch, seconds in times.items():
        assert curve.time_s(batch) == pytest.approx(seconds)
    assert curve.time_s(80) == pytest.approx(0.0102 + (0.030 - 0.0102) * 48 / 96)
    # Beyond the last point: the last segment's slope.
    assert curve.time_s(1024) == pytest.approx(0.110 + (0.110 - 0.030) / 384 * 512)


def test_piecewise_is_flat_below_the_smallest_measured_batch():
    curve = fit_time_curve(measured("cuda:0", {8: 0.010, 32: 0.0102, 128: 0.030}))
    assert curve.time_s(1) == curve.time_s(8) == pytest.approx(0.010)


def test_a_point_outside_five_percent_rejects_the_line_unless_its_iqr_covers_it():
    exact = {n: 0.002 + 0.001 * n for n in (1, 8, 32, 128, 512)}
    bumped = {**exact, 32: exact[32] * 1.3}
    assert fit_time_curve(measured("cpu/4t", bumped)).kind == "piecewise"
    small = {**exact, 32: exact[32] * 1.01}
    assert fit_time_curve(measured("cpu/4t", small)).kind == "affine"
    noisy = DeviceProfile(config=config("cpu/4t"), points=tuple(
        BatchPoint(batch_size=n, status="ok", forward_backward=stats(t, iqr=0.5 * t), optimizer_step=stats(0.001))
        for n, t in sorted(bumped.items())))
    assert fit_time_curve(noisy).kind == "affine"


def test_negative_intercept_falls_back_to_piecewise():
    times = {8: 0.001, 16: 0.010, 32: 0.028}  # steeper than proportional: the line crosses zero
    curve = fit_time_curve(measured("cpu/1t", times))
    assert curve.kind == "piecewise"
    assert curve.time_s(1) == pytest.approx(0.001)


def test_non_monotone_medians_are_made_monotone():
    times = {1: 0.010, 8: 0.014, 32: 0.012, 128: 0.030}
    curve = fit_time_curve(measured("cuda:0", times))
    assert curve.kind == "piecewise"
    assert curve.time_s(8) == curve.time_s(32) == pytest.approx(0.013)
    values = [curve.time_s(b) for b in range(1, 300)]
    assert values == sorted(values)


def test_flat_last_segment_extrapolates_with_the_overall_slope():
    curve = fit_time_curve(measured("cuda:0", {1: 0.010, 8: 0.020, 32: 0.020}))
    assert curve.extrapolation_slope_s == pytest.approx((0.020 - 0.010) / 31)
    assert curve.time_s(64) > curve.time_s(32)


@pytest.mark.parametrize("times, kind", [
    ({1: 0.001, 8: 0.001, 32: 0.001}, "affine"),  # exactly flat: the line has slope 0
    ({1: 0.0012, 8: 0.001, 32: 0.001}, "piecewise"),  # all pooled into one flat knot
])
def test_a_flat_curve_extrapolates_proportionally_never_for_free(times, kind):
    # Launch-bound at 1 ms up to batch 32 says nothing about batch 4096 except that it is
    # not free: 4096 samples cost at least 128 times what 32 did.
    curve = fit_time_curve(measured("cuda:0", times))
    assert curve.kind == kind
    last = curve.time_s(32)
    assert curve.time_s(4096) == pytest.approx(last * 4096 / 32)
    assert curve.time_s(33) == pytest.approx(last * 33 / 32)


def test_single_point_is_flat_below_and_proportional_above():
    curve = fit_time_curve(measured("cpu/2t", {16: 0.032}))
    assert curve.kind == "single_point"
    assert curve.time_s(4) == pytest.approx(0.032)
    assert curve.time_s(64) == pytest.approx(0.128)


def test_oom_and_error_points_are_not_fitted_and_oom_limits_the_batch():
    device = affine("cpu/4t", 0.002, 0.001, oom_from=128)
    with_error = DeviceProfile(config=device.config, points=device.points + (
        BatchPoint(batch_size=64, status="error", error="worker died"),))
    curve = fit_time_curve(with_error)
    assert curve.kind == "affine" and curve.batch_sizes == (1, 8, 32)
    assert curve.largest_fitting_batch == 127
    assert curve.fits_in_memory(127) and not curve.fits_in_memory(128)


def test_oom_below_a_batch_that_ran_is_transient():
    device = affine("cpu/4t", 0.002, 0.001)
    device = DeviceProfile(config=device.config, points=device.points + (BatchPoint(batch_size=16, status="oom"),))
    assert fit_time_curve(device).largest_fitting_batch is None


def test_repeated_batch_sizes_are_merged():
    repeated = [(8, 0.010), (8, 0.012), (8, 0.020), (16, 0.030)]
    device = DeviceProfile(config=config("cpu/1t"), points=points(repeated, 0.001))
    curve = fit_time_curve(device)
    assert curve.batch_sizes == (8, 16)
    assert curve.time_s(8) == pytest.approx(0.012)


def test_uncertainty_follows_the_relative_iqr():
    curve = fit_time_curve(affine("cpu/4t", 0.002, 0.001, iqr_share=0.1))
    assert curve.uncertainty_s(100) == pytest.approx(0.1 * 0.102)
    assert fit_time_curve(affine("cpu/4t", 0.002, 0.001)).uncertainty_s(100) == 0.0


def test_optimizer_step_is_the_median_over_points():
    device = DeviceProfile(config=config("cpu/1t"), points=tuple(
        BatchPoint(batch_size=n, status="ok", forward_backward=stats(0.01 * n), optimizer_step=stats(opt))
        for n, opt in [(1, 0.003), (2, 0.001), (4, 0.002)]))
    assert optimizer_step_time_s(device) == pytest.approx(0.002)


def test_a_device_without_ok_points_cannot_be_fitted():
    device = DeviceProfile(config=config("cpu/8t"), points=(BatchPoint(batch_size=1, status="oom"),))
    with pytest.raises(UserInputError, match="cpu/8t"):
        fit_time_curve(device)


def _isotonic_reference(ys: list[float]) -> list[float]:
    """The min-max formula: y*_i = max_{j<=i} min_{k>=i} mean(y_j..y_k)."""
    n = len(ys)
    return [max(min(sum(ys[j:k + 1]) / (k + 1 - j) for k in range(i, n)) for j in range(i + 1)) for i in range(n)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.001, 10.0), min_size=1, max_size=9))
def test_isotonic_matches_the_min_max_formula(ys):
    assert isotonic(ys) == pytest.approx(_isotonic_reference(ys), rel=1e-9)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.integers(1, 2048), st.floats(1e-4, 1.0), min_size=1, max_size=7))
def test_every_fitted_curve_is_monotone_and_positive(times):
    curve = fit_time_curve(measured("cpu/2t", times))
    probes = sorted({1, 2, 4096, *times, *(b + 1 for b in times), *(max(1, b - 1) for b in times)})
    values = [curve.time_s(b) for b in probes]
    assert all(v > 0 for v in values)
    assert all(a <= b * (1 + 1e-12) for a, b in zip(values, values[1:]))


@settings(max_examples=100, deadline=None)
@given(st.floats(0.0, 0.1), st.floats(1e-6, 0.01), st.floats(0.05, 1.0))
def test_more_threads_never_need_more_time(a, b, speedup):
    # A configuration faster at every measured batch is faster at every batch.
    slow = fit_time_curve(affine("cpu/2t", a, b))
    fast = fit_time_curve(measured("cpu/4t", {n: speedup * (a + b * n) for n in (1, 8, 32, 128, 512)}))
    assert all(fast.time_s(n) <= slow.time_s(n) * (1 + 1e-9) for n in (1, 3, 8, 50, 512, 900))
