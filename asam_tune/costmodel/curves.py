"""Time-versus-batch-size curves fitted to a device configuration's measured points (no torch).

A curve is monotone non-decreasing in the batch size. It is the weighted least-squares line
``t = a + b * batch`` when that line explains every measured median within
``sigma = max(IQR, AFFINE_TOLERANCE * median)`` (the weights are ``1 / sigma^2``) with
``a >= 0`` and ``b >= 0``; otherwise it is the piecewise-linear interpolation of the medians
made monotone by isotonic regression. Beyond the largest measured batch it keeps rising (never
flat, so never optimistic). See docs/cost-model.md.
"""
from __future__ import annotations

import bisect
import statistics
from dataclasses import dataclass
from typing import Literal

from asam_tune.errors import UserInputError
from asam_tune.records.profile import BatchPoint, DeviceProfile

# A line is accepted when every residual is within this fraction of its median (or the
# point's IQR when that is larger): tighter than the 10% the predictions are judged by.
AFFINE_TOLERANCE = 0.05

# Least squares through exactly affine data leaves intercepts of about -1e-17.
_ROUNDING = 1e-9

CurveKind = Literal["affine", "piecewise", "single_point"]


@dataclass(frozen=True)
class TimeCurve:
    """Forward+backward seconds of one device configuration as a function of batch size."""

    key: str
    kind: CurveKind
    batch_sizes: tuple[int, ...]  # measured, ascending, distinct
    medians_s: tuple[float, ...]  # measured medians made monotone (the knots when piecewise)
    relative_spread: tuple[float, ...]  # IQR / median at each measured batch size
    intercept_s: float  # affine only (0 otherwise)
    slope_s: float  # affine only (0 otherwise)
    extrapolation_slope_s: float  # seconds per sample beyond the largest measured batch
    # Largest batch that fits in memory when the profile saw an OOM above the measured range.
    largest_fitting_batch: int | None = None

    def time_s(self, batch: int) -> float:
        first, last = self.batch_sizes[0], self.batch_sizes[-1]
        if batch > last:
            return self.medians_s[-1] + self.extrapolation_slope_s * (batch - last)
        if self.kind == "affine":
            return self.intercept_s + self.slope_s * batch
        if batch <= first:
            # Flat below the smallest measured batch: monotone, never negative, never optimistic.
            return self.medians_s[0]
        if batch == last:
            return self.medians_s[-1]
        right = bisect.bisect_left(self.batch_sizes, batch)
        b0, b1 = self.batch_sizes[right - 1], self.batch_sizes[right]
        t0, t1 = self.medians_s[right - 1], self.medians_s[right]
        return t0 + (t1 - t0) * (batch - b0) / (b1 - b0)

    def uncertainty_s(self, batch: int) -> float:
        """The predicted time times the measured IQR/median, interpolated over batch size."""
        return self.time_s(batch) * _interpolate(self.batch_sizes, self.relative_spread, batch)

    def is_extrapolated(self, batch: int) -> bool:
        return batch > self.batch_sizes[-1]

    def fits_in_memory(self, batch: int) -> bool:
        return self.largest_fitting_batch is None or batch <= self.largest_fitting_batch


def _interpolate(xs: tuple[int, ...], ys: tuple[float, ...], x: int) -> float:
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    right = bisect.bisect_left(xs, x)
    x0, x1, y0, y1 = xs[right - 1], xs[right], ys[right - 1], ys[right]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def isotonic(values: list[float]) -> list[float]:
    """Pool-adjacent-violators: the closest non-decreasing sequence in least squares."""
    blocks: list[list[float]] = []  # [mean, count]
    for value in values:
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, count = blocks.pop()
            previous = blocks[-1]
            total = previous[1] + count
            previous[0] = (previous[0] * previous[1] + mean * count) / total
            previous[1] = total
    result: list[float] = []
    for mean, count in blocks:
        result.extend([mean] * int(count))
    return result


def least_squares_line(xs: list[int], ys: list[float], weights: list[float] | None = None) -> tuple[float, float]:
    """Intercept and slope of the (weighted) least-squares line through (xs, ys)."""
    w = weights or [1.0] * len(xs)
    total = sum(w)
    mean_x = sum(wi * x for wi, x in zip(w, xs)) / total
    mean_y = sum(wi * y for wi, y in zip(w, ys)) / total
    sxx = sum(wi * (x - mean_x) ** 2 for wi, x in zip(w, xs))
    if sxx == 0:
        return mean_y, 0.0
    slope = sum(wi * (x - mean_x) * (y - mean_y) for wi, x, y in zip(w, xs, ys)) / sxx
    return mean_y - slope * mean_x, slope


def _extrapolation_slope(slope: float, last_batch: int, last_median: float) -> float:
    """The slope beyond the measured range: a flat one would predict free work, the one
    optimistic error, so a slope that adds no more than rounding over the measured range gives
    way to proportional growth (no economy of scale beyond what was measured)."""
    if slope * last_batch <= _ROUNDING * last_median:
        return last_median / last_batch
    return slope


def _merged_points(points: list[BatchPoint]) -> tuple[list[int], list[float], list[float]]:
    """Batch sizes, medians and IQRs, one per distinct batch size (repeats: median of medians)."""
    by_batch: dict[int, list[BatchPoint]] = {}
    for point in points:
        by_batch.setdefault(point.batch_size, []).append(point)
    batches = sorted(by_batch)
    medians = [statistics.median(p.forward_backward.median_s for p in by_batch[b]) for b in batches]
    iqrs = [max(p.forward_backward.iqr_s for p in by_batch[b]) for b in batches]
    return batches, medians, iqrs


def _largest_fitting_batch(device: DeviceProfile, largest_ok: int) -> int | None:
    # An OOM at or below a batch that ran is taken as transient (fragmentation) and ignored.
    ooms = [p.batch_size for p in device.points if p.status == "oom" and p.batch_size > largest_ok]
    return min(ooms) - 1 if ooms else None


def fit_time_curve(device: DeviceProfile) -> TimeCurve:
    """Fit the forward+backward curve of one configuration from its 'ok' points."""
    key = device.config.key
    ok = device.ok_points()
    if not ok:
        raise UserInputError(f"no successful timing for device configuration {key!r} in the profile")
    batches, medians, iqrs = _merged_points(ok)
    spread = tuple(iqr / median for iqr, median in zip(iqrs, medians))
    fitting = _largest_fitting_batch(device, batches[-1])
    if len(batches) == 1:
        # One point: flat below it, proportional to the batch above it (no economy of scale).
        return TimeCurve(key, "single_point", tuple(batches), tuple(medians), spread, 0.0, 0.0,
                         medians[0] / batches[0], fitting)

    # Each point weighs 1 / sigma^2 with sigma = max(IQR, AFFINE_TOLERANCE * median): relative
    # errors count alike from batch 1 to 1024, and noisy points count less.
    sigmas = [max(iqr, AFFINE_TOLERANCE * t) for t, iqr in zip(medians, iqrs)]
    intercept, slope = least_squares_line(batches, medians, [1 / sigma**2 for sigma in sigmas])
    explains_all = all(abs(intercept + slope * b - t) <= sigma for b, t, sigma in zip(batches, medians, sigmas))
    # A negative intercept beyond rounding would predict less than nothing at small batches.
    if explains_all and intercept >= -_ROUNDING * medians[0] and slope >= 0:
        intercept = max(intercept, 0.0)
        fitted = tuple(intercept + slope * b for b in batches)
        return TimeCurve(key, "affine", tuple(batches), fitted, spread, intercept, slope,
                         _extrapolation_slope(slope, batches[-1], fitted[-1]), fitting)

    knots = isotonic(medians)
    last_slope = (knots[-1] - knots[-2]) / (batches[-1] - batches[-2])
    # A flat last segment (a plateau, or pooled violators) would extrapolate to free work:
    # fall back to the slope over the whole measured range, or proportional when that is flat too.
    if last_slope <= 0:
        last_slope = (knots[-1] - knots[0]) / (batches[-1] - batches[0])
    return TimeCurve(key, "piecewise", tuple(batches), tuple(knots), spread, 0.0, 0.0,
                     _extrapolation_slope(last_slope, batches[-1], knots[-1]), fitting)


def optimizer_step_time_s(device: DeviceProfile) -> float:
    """The optimizer step does not depend on the batch size: the median over the ok points."""
    ok = device.ok_points()
    if not ok:
        raise UserInputError(f"no successful timing for device configuration {device.config.key!r} in the profile")
    return statistics.median(p.optimizer_step.median_s for p in ok)


def optimizer_step_spread_s(device: DeviceProfile) -> float:
    return statistics.median(p.optimizer_step.iqr_s for p in device.ok_points())
