"""Choosing each method's rho on the validation split: a short walk on a ladder of values.

The walk starts at three neighbouring values around a first guess and steps outward while the
best validation accuracy (mean over the sweep seeds) sits at an end of what was tried, at most
``MAX_EXTENSIONS`` times. The chosen rho is the ladder value with the best mean validation
accuracy. ``best_rho_estimate`` refines it between ladder values for the rho study: the vertex
of the parabola through the best point and its two neighbours, in log rho.
"""
from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Callable, Sequence

from asam_tune.errors import UserInputError

MAX_EXTENSIONS = 5

# rho ladders (roughly x1.3-1.5 apart). SGD with momentum wants larger rho than AdamW does.
LADDERS = {
    "sgd": (0.05, 0.1, 0.15, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.25, 1.6, 2.0, 2.5, 3.2, 4.0),
    "adamw": (0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.25),
    "mesa": (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
}


def nearest_index(ladder: Sequence[float], value: float) -> int:
    return min(range(len(ladder)), key=lambda i: abs(math.log(ladder[i]) - math.log(value)))


def walk(ladder: Sequence[float], guess: float, score: Callable[[float], float], *,
         max_extensions: int = MAX_EXTENSIONS) -> tuple[float, dict[float, float]]:
    """The ladder value with the best ``score`` (higher is better) and every score computed."""
    if not ladder:
        raise UserInputError("an empty rho ladder")
    centre = nearest_index(ladder, guess)
    low, high = max(0, centre - 1), min(len(ladder) - 1, centre + 1)
    scores = {ladder[i]: score(ladder[i]) for i in range(low, high + 1)}
    for _ in range(max_extensions):
        best = max(scores, key=scores.get)
        index = ladder.index(best)
        if index == low and low > 0:
            low -= 1
            scores[ladder[low]] = score(ladder[low])
        elif index == high and high < len(ladder) - 1:
            high += 1
            scores[ladder[high]] = score(ladder[high])
        else:
            break
    return max(scores, key=scores.get), dict(sorted(scores.items()))


def best_rho_estimate(scores: dict[float, float]) -> dict:
    """The best rho refined between ladder values, with what it was estimated from.

    At an end of the tried range (or with fewer than three points) the best tried value is
    returned with ``"at_edge": True``: the optimum may lie beyond.
    """
    values = sorted(scores)
    if not values:
        raise UserInputError("no scores to estimate a best rho from")
    best = max(values, key=lambda r: scores[r])
    index = values.index(best)
    if len(values) < 3 or index in (0, len(values) - 1):
        return {"rho": best, "at_edge": len(values) > 1 and index in (0, len(values) - 1), "method": "best tried"}
    xs = [math.log(values[i]) for i in (index - 1, index, index + 1)]
    ys = [scores[values[i]] for i in (index - 1, index, index + 1)]
    # Vertex of the parabola through three points (x0 < x1 < x2, y1 the largest).
    d1 = (ys[1] - ys[0]) / (xs[1] - xs[0])
    d2 = (ys[2] - ys[1]) / (xs[2] - xs[1])
    curvature = (d2 - d1) / (xs[2] - xs[0])
    if curvature >= 0:
        return {"rho": best, "at_edge": False, "method": "best tried (flat)"}
    vertex = (xs[0] + xs[1]) / 2 - d1 / (2 * curvature)
    vertex = min(max(vertex, xs[0]), xs[2])
    return {"rho": math.exp(vertex), "at_edge": False, "method": "parabola in log rho"}


def mean(values: Sequence[float]) -> float:
    return statistics.mean(values)


def bracket(ladder: Sequence[float], value: float) -> tuple[float, float]:
    """The ladder values either side of ``value`` (for reports)."""
    i = bisect.bisect_left(ladder, value)
    return ladder[max(0, i - 1)], ladder[min(len(ladder) - 1, i)]


__all__ = ["LADDERS", "walk", "best_rho_estimate", "nearest_index", "MAX_EXTENSIONS"]
