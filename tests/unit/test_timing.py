"""timing.measure with a fake clock: exact numbers, sync inside the timer, repeats, noise.

Fake durations are sums of powers of two, so that clock differences are exact in binary.
"""
from __future__ import annotations

import statistics

import numpy as np
import pytest

from asam_tune.errors import UserInputError
from asam_tune.timing import MIN_SAMPLE_S, FakeClock, MeasureSettings, PerfClock, measure, summarize

KNOBS = dict(warmup=2, min_time_s=1.0, min_repeats=5, max_repeats=50, noise_threshold=0.1)


def test_constant_operation_gives_exact_median_and_zero_spread():
    clock = FakeClock()
    stats = measure(lambda: clock.advance(0.25), sync=lambda: None, clock=clock, **KNOBS)
    assert stats.median_s == 0.25
    assert stats.iqr_s == 0.0
    assert not stats.noisy
    # min_time 1.0 s at 0.25 s per sample needs 4 samples, but min_repeats asks for 5.
    assert stats.samples_s == (0.25,) * 5


def test_repeats_until_min_time_when_samples_are_short():
    clock = FakeClock()
    stats = measure(lambda: clock.advance(0.125), sync=lambda: None, clock=clock, **KNOBS)
    assert stats.samples_s == (0.125,) * 8  # 8 x 0.125 s reaches min_time_s = 1.0


def test_max_repeats_caps_a_very_fast_operation():
    clock = FakeClock()
    stats = measure(lambda: clock.advance(1e-6), sync=lambda: None, clock=clock, **KNOBS)
    assert len(stats.samples_s) == 50


def test_warmup_runs_are_not_timed():
    clock = FakeClock()
    durations = iter([5.0, 5.0] + [0.5] * 100)  # two slow first calls, as kernel selection
    stats = measure(lambda: clock.advance(next(durations)), sync=lambda: None, clock=clock, **KNOBS)
    assert stats.samples_s == (0.5,) * 5


def test_work_finished_only_at_sync_is_inside_the_timer():
    clock = FakeClock()
    queued = []

    def run():  # an asynchronous device: launching costs nothing
        queued.append(0.375)

    def sync():
        clock.advance(sum(queued))
        queued.clear()

    stats = measure(run, sync=sync, clock=clock, **KNOBS)
    assert stats.samples_s == (0.375,) * 5


def test_median_and_iqr_match_numpy_on_uneven_samples():
    durations = [0.1, 0.5, 0.2, 0.9, 0.3, 0.4, 0.35]
    stats = summarize(durations, noise_threshold=0.1)
    q1, q3 = np.percentile(durations, [25, 75])
    assert stats.median_s == pytest.approx(statistics.median(durations))
    assert stats.iqr_s == pytest.approx(q3 - q1)
    assert stats.samples_s == tuple(durations)  # raw samples kept, in order


def test_jittering_clock_is_flagged_noisy_and_a_steady_one_is_not():
    clock = FakeClock()
    jitter = iter([0.0, 0.0] + [0.0, 0.08, -0.05, 0.1, -0.08, 0.06] * 10)
    noisy = measure(lambda: clock.advance(0.5 + next(jitter)), sync=lambda: None, clock=clock,
                    warmup=2, min_time_s=2.0, min_repeats=6, max_repeats=6, noise_threshold=0.1)
    assert noisy.noisy
    assert noisy.iqr_s / noisy.median_s > 0.1
    small = iter([0.0, 0.0] + [0.0, 0.01, -0.01, 0.02, -0.02, 0.01] * 10)
    steady = measure(lambda: clock.advance(0.5 + next(small)), sync=lambda: None, clock=clock,
                     warmup=2, min_time_s=2.0, min_repeats=6, max_repeats=6, noise_threshold=0.1)
    assert not steady.noisy


def test_sample_faster_than_the_clock_is_kept_positive():
    clock = FakeClock()
    stats = measure(lambda: None, sync=lambda: None, clock=clock, warmup=0, min_time_s=1.0,
                    min_repeats=1, max_repeats=3, noise_threshold=0.1)
    assert stats.samples_s == (MIN_SAMPLE_S,) * 3


def test_perf_clock_is_monotonic():
    clock = PerfClock()
    a = clock.now()
    assert clock.now() >= a


def test_fake_clock_refuses_to_go_back():
    with pytest.raises(ValueError, match="-1"):
        FakeClock().advance(-1)


@pytest.mark.parametrize("bad", [
    dict(warmup=-1), dict(min_time_s=0.0), dict(min_repeats=0), dict(max_repeats=2, min_repeats=3),
    dict(noise_threshold=0.0), dict(warmup=True),
])
def test_bad_settings_are_user_errors_naming_the_value(bad):
    with pytest.raises(UserInputError, match=repr(list(bad.values())[0]).replace(".", r"\.")):
        MeasureSettings(**bad)
