"""BatchSizeAdapter driven by fake step measurements: exact b_p sequences (no torch, no clock)."""
from __future__ import annotations

import logging
from collections import deque

import pytest

from asam_tune.errors import UserInputError
from asam_tune.runtime.adaptation import AdaptationSettings, BatchSizeAdapter

# Small numbers so that the sequences can be followed by hand: a window of 4 steps, shrink on
# 2 late steps in it (more than 25%), 2 steps of cool-down after each change.
SMALL = AdaptationSettings(window=4, late_fraction=0.25, late_tolerance=0.02, grow_idle_share=0.2,
                           target_share=0.9, cooldown=2, max_growth=2.0, ceiling_ttl=30)

LATE = dict(step_time_s=0.010, waited_s=0.005, worker_idle_s=0.0)  # main compute 5 ms, waited 5 ms
IDLE = dict(step_time_s=0.010, waited_s=0.0, worker_idle_s=0.005)  # worker busy 5 ms of 10
SNUG = dict(step_time_s=0.010, waited_s=0.0, worker_idle_s=0.001)  # idles 10%: inside the band


def drive(adapter: BatchSizeAdapter, observations) -> list[int]:
    return [adapter.observe(**o) for o in observations]


def test_shrinks_on_lateness_to_the_size_that_fits_then_stops_at_one():
    adapter = BatchSizeAdapter(32, 64, SMALL)
    sizes = drive(adapter, [LATE] * 18)
    # Each change: floor(b * 0.9 * 5 / (5 + 5)); the second late step of a window triggers it,
    # then 2 steps of cool-down and a fresh window.
    assert sizes == [32, 14, 14, 14, 14, 6, 6, 6, 6, 2, 2, 2, 2, 1, 1, 1, 1, 1]
    assert adapter.trajectory == [(0, 32), (2, 14), (6, 6), (10, 2), (14, 1)]


def test_a_single_late_step_in_a_window_changes_nothing():
    adapter = BatchSizeAdapter(32, 64, SMALL)
    assert drive(adapter, [LATE, SNUG, SNUG, SNUG, SNUG, LATE, SNUG, SNUG]) == [32] * 8


def test_grows_on_idleness_up_to_the_bound_and_never_above():
    adapter = BatchSizeAdapter(10, 64, SMALL)
    sizes = drive(adapter, [IDLE] * 26)
    # floor(b * 0.9 * 10 / 5) = 1.8 b, at most 2 b, at most the bound; each after a full window.
    assert sizes == [10, 10, 10, 18, 18, 18, 18, 18, 18, 32, 32, 32, 32, 32, 32, 57,
                     57, 57, 57, 57, 57, 64, 64, 64, 64, 64]
    assert adapter.trajectory == [(0, 10), (4, 18), (10, 32), (16, 57), (22, 64)]


def test_growth_is_at_most_the_factor_per_change():
    adapter = BatchSizeAdapter(4, 1000, SMALL)
    mostly_idle = dict(step_time_s=0.010, waited_s=0.0, worker_idle_s=0.009)  # would say x9
    drive(adapter, [mostly_idle] * 10)
    assert adapter.trajectory == [(0, 4), (4, 8), (10, 16)]


def test_alternating_noise_does_not_oscillate():
    adapter = BatchSizeAdapter(20, 64, SMALL)
    # Every fourth step is late, the others idle a lot: no window has two late steps (no
    # shrink), and none is free of lateness (no growth).
    noisy = [LATE if i % 4 == 3 else IDLE for i in range(60)]
    assert drive(adapter, noisy) == [20] * 60
    # A worker sized to the target idles 10% of the step: inside the band, left alone.
    assert drive(adapter, [SNUG] * 40) == [20] * 40
    assert adapter.trajectory == [(0, 20)]


def _plant(adapter: BatchSizeAdapter, steps: int, worker_s, compute_s: float = 0.010) -> list[int]:
    """Closed loop: the worker's time depends on the b_p its job was submitted with.

    With staleness 1, the size returned after step k is used by the job submitted in step
    k + 1, which the main device collects in step k + 2: a lag of two observations.
    """
    in_flight = deque([adapter.batch_size, adapter.batch_size])
    sizes = []
    for step in range(steps):
        worker = worker_s(step, in_flight.popleft())
        waited = max(0.0, worker - compute_s)
        idle = max(0.0, compute_s - worker)
        size = adapter.observe(step_time_s=compute_s + waited, waited_s=waited, worker_idle_s=idle)
        in_flight.append(size)
        sizes.append(size)
    return sizes


def test_closed_loop_recovers_from_a_wrong_plan_and_a_competing_load_without_oscillating():
    # Worker time 1 ms + 0.2 ms per sample (0.4 ms while a competing load runs, steps 40-79);
    # main compute 10 ms, so b_p <= 45 is hidden (<= 22 under the load). The plan says 90.
    def worker_s(step: int, b: int) -> float:
        per_sample = 0.0004 if 40 <= step < 80 else 0.0002
        return 0.001 + per_sample * b

    adapter = BatchSizeAdapter(90, 128, SMALL)
    sizes = _plant(adapter, 160, worker_s)
    # 90 -> 42 = floor(90 * 0.9 * 10 / 19): one cut fits the worker (9.4 ms of 10). Under the
    # load it is late again: 42 -> 21 = floor(42 * 0.9 * 10 / 17.8). When the load ends, two
    # idle steps (48%) beside two snug ones (6%) make the median idle share 27%: grow by the
    # median busy time, 21 -> 25 = floor(21 * 0.9 * 10 / 7.3); a clean window then gives
    # 25 -> 37 = floor(25 * 0.9 * 10 / 6), which idles 16%: inside the band, it stays.
    assert adapter.trajectory == [(0, 90), (2, 42), (42, 21), (82, 25), (88, 37)]
    assert sizes[-1] == 37 and all(1 <= s <= 128 for s in sizes)


def test_ceiling_stops_growth_below_a_size_that_was_late():
    # Fits up to 45; above that it is late. Start at 47 (late), then idle conditions say grow.
    adapter = BatchSizeAdapter(47, 128, AdaptationSettings(
        window=4, late_fraction=0.25, grow_idle_share=0.2, target_share=0.9, cooldown=2, ceiling_ttl=1000))
    late = dict(step_time_s=0.0105, waited_s=0.0005, worker_idle_s=0.0)
    drive(adapter, [late] * 2)
    shrunk = adapter.batch_size
    assert shrunk == 40  # floor(47 * 0.9 * 10 / 10.5)
    drive(adapter, [IDLE] * 40)  # would grow x1.8, but 47 was late: at most 46
    assert adapter.trajectory == [(0, 47), (2, 40), (8, 46)]


def test_ceiling_expires():
    settings = AdaptationSettings(window=4, late_fraction=0.25, cooldown=2, ceiling_ttl=10)
    adapter = BatchSizeAdapter(40, 128, settings)
    drive(adapter, [LATE] * 2)  # 40 -> 18, ceiling 40 until step 12
    drive(adapter, [IDLE] * 12)  # grows to 32 at step 8 (below 40); the next window ends at 14
    # At step 14 the ceiling has expired: floor(32 * 1.8) = 57, not 39.
    assert adapter.trajectory == [(0, 40), (2, 18), (8, 32), (14, 57)]


def test_every_change_is_logged(caplog):
    adapter = BatchSizeAdapter(32, 64, SMALL)
    with caplog.at_level(logging.INFO, logger="asam_tune.runtime.adaptation"):
        drive(adapter, [LATE] * 2)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["b_p 32 -> 14 after step 2"]
    assert "late on 2 of the last 2 steps" in caplog.records[0].getMessage()


def test_late_at_one_warns_once(caplog):
    adapter = BatchSizeAdapter(1, 8, SMALL)
    with caplog.at_level(logging.INFO, logger="asam_tune.runtime.adaptation"):
        assert drive(adapter, [LATE] * 12) == [1] * 12
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "non-blocking" in warnings[0].getMessage()


def test_state_dict_resumes_the_exact_sequence():
    observations = [LATE] * 3 + [IDLE] * 20 + [LATE] * 5
    straight = BatchSizeAdapter(30, 64, SMALL)
    expected = drive(straight, observations)
    first = BatchSizeAdapter(30, 64, SMALL)
    got = drive(first, observations[:11])
    resumed = BatchSizeAdapter(1, 1)
    resumed.load_state_dict(first.state_dict())
    got += drive(resumed, observations[11:])
    assert got == expected and resumed.trajectory == straight.trajectory


@pytest.mark.parametrize("kwargs", [
    dict(initial=0, bound=4), dict(initial=5, bound=4), dict(initial=2, bound=True), dict(initial=2.0, bound=4),
])
def test_rejects_bad_sizes(kwargs):
    with pytest.raises(UserInputError):
        BatchSizeAdapter(**kwargs)


@pytest.mark.parametrize("observation", [
    dict(step_time_s=0.01, waited_s=-1.0, worker_idle_s=0.0),
    dict(step_time_s=0.01, waited_s=0.01, worker_idle_s=0.0),
    dict(step_time_s=float("nan"), waited_s=0.0, worker_idle_s=0.0),
    dict(step_time_s=0.01, waited_s=0.0, worker_idle_s=float("inf")),
])
def test_rejects_bad_observations(observation):
    with pytest.raises(UserInputError):
        BatchSizeAdapter(4, 8).observe(**observation)


@pytest.mark.parametrize("kwargs", [
    dict(window=0), dict(cooldown=-1), dict(late_fraction=1.0), dict(target_share=0.0),
    dict(target_share=0.9, grow_idle_share=0.1), dict(max_growth=1.0),
])
def test_rejects_bad_settings(kwargs):
    with pytest.raises(UserInputError):
        AdaptationSettings(**kwargs)


def test_trajectory_uses_the_runtimes_step_numbers_when_given():
    adapter = BatchSizeAdapter(32, 64, SMALL)
    for step, observation in enumerate([LATE] * 3, start=100):
        adapter.observe(**observation, step=step)
    assert adapter.trajectory == [(0, 32), (101, 14)]


def test_the_quality_floor_stops_shrinking_and_survives_a_checkpoint():
    adapter = BatchSizeAdapter(40, 100, AdaptationSettings(window=4, cooldown=1), floor=25)
    for step in range(40):  # always late: the main step waits 5 of every 10
        adapter.observe(step_time_s=10.0, waited_s=5.0, worker_idle_s=0.0, step=step)
    assert adapter.batch_size == 25 and min(b for _, b in adapter.trajectory) == 25
    copy = BatchSizeAdapter(1, 1)
    copy.load_state_dict(adapter.state_dict())
    assert copy.floor == 25
    assert BatchSizeAdapter(10, 100, floor=25).batch_size == 25  # a start below the floor is raised to it
