"""AsyncSAM's online b_p adaptation, on a simulated clock: the exact b_p of every job handed over.

A fake worker computes real perturbations in-process, but its time is simulated: a job of b
samples takes ``worker_s(step, b)`` on a shared fake clock, which ``collect`` advances when the
main process would block; the loss function advances it by the main compute ``COMPUTE``. Times
are multiples of 1/4 so that every difference is exact in floating point.
"""
from __future__ import annotations

import dataclasses
import io
import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from asam_tune.errors import UserInputError
from asam_tune.runtime import AsyncSAM
from asam_tune.runtime.adaptation import AdaptationSettings
from asam_tune.perturbers.base import AscentJob, AscentTask
from asam_tune.perturbers.batches import OutputTargetLoss
from asam_tune.perturbers.in_process import InProcessPerturber
from asam_tune.records.rho_rule import DEFAULT_RHO_RULE
from asam_tune.runtime.options import settings_from_plan
from tests.unit.test_async_sam import RHO, batches, bitwise_equal, mlp, one_thread, sgd  # noqa: F401

# As in test_adaptation.py: a window of 4 steps, shrink on 2 late ones, 2 steps of cool-down.
SMALL = AdaptationSettings(window=4, late_fraction=0.25, late_tolerance=0.02, grow_idle_share=0.2,
                           target_share=0.9, cooldown=2, max_growth=2.0, ceiling_ttl=30)
COMPUTE = 10.0  # simulated main compute per step
B = 64


class SimClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SimulatedWorker:
    """A Perturber whose jobs take simulated time; records the rows and the rho of every job.

    The object is AsyncSAM's perturber factory: called with the run's task it returns itself.
    Its ascent uses the plain loss, so that only the main step's loss advances the clock.
    """

    def __init__(self, clock: SimClock, worker_s):
        self.inner: InProcessPerturber | None = None
        self.clock, self.worker_s = clock, worker_s
        self.rows: list[int] = []
        self.rhos: list[float] = []
        self.ready_at = self.compute_s = 0.0

    def __call__(self, task: AscentTask) -> SimulatedWorker:
        self.inner = InProcessPerturber(dataclasses.replace(task, compute_loss=OutputTargetLoss(F.cross_entropy)))
        return self

    def submit(self, job: AscentJob):
        rows = job.batch[0].shape[0]
        self.rows.append(rows)
        self.rhos.append(job.rho)
        self.inner.submit(job)
        self.compute_s = self.worker_s(job.step, rows)
        self.ready_at = self.clock.now + self.compute_s

    def ready(self):
        return self.clock.now >= self.ready_at

    def collect(self, timeout):
        self.clock.now = max(self.clock.now, self.ready_at)  # block until the job is done
        result = self.inner.collect(timeout)
        result.compute_time_s = self.compute_s
        return result

    def close(self):
        self.inner.close()


def timed_loss(clock: SimClock):
    def loss_fn(output, target):
        clock.now += COMPUTE
        return F.cross_entropy(output, target)
    return loss_fn


def wrong_plan_then_load(step: int, b: int) -> float:
    """1 + b/4 (b <= 36 is hidden in 10); twice as slow for jobs handed over in steps 12-23."""
    return 1.0 + b / (2.0 if 12 <= step < 24 else 4.0)


def make_sam(model, clock, worker_s, **kwargs):
    worker = SimulatedWorker(clock, worker_s)
    options = {"adapt": SMALL, "clock": clock, "perturber": worker, **kwargs}
    return AsyncSAM(model, sgd(model), timed_loss(clock), rho=RHO, **options), worker


def train(sam, data):
    for x, y in sam.lookahead(data):
        sam.step(x, y)


# Worked out by hand from the adapter's rules (see test_adaptation.py). The size set after step
# t is used by the job handed over in step t + 1, whose observation arrives in step t + 2.
#  - b=64 takes 17 of 10: steps 1 and 2 are late, 2 > 25% of 4: 64 -> floor(64*.9*10/17) = 33.
#  - 33 takes 9.25 (idle 7.5%, inside the band) until the load: the jobs of steps 12 and 13
#    take 17.5, late in steps 13 and 14: 33 -> floor(33*.9*10/17.5) = 16 (33 is now a ceiling).
#  - 16 takes 9 under the load (idle 10%). From step 24 it takes 5: in step 26 the window's
#    median idle share is 30%, its median busy time 7: 16 -> floor(16*.9*10/7) = 20.
#  - 20 takes 6 (idle 40%): after a full window, 20 -> floor(20*.9*10/6) = 30 (below the
#    ceiling 32 and twice 20); 30 takes 8.5, idles 15%: it stays.
EXPECTED_TRAJECTORY = ((0, 64), (2, 33), (14, 16), (26, 20), (32, 30))
STEPS = 40
# Step 0's own synchronous job, then the job handed over in each of steps 0-38 (step 39 is the
# last of the lookahead: nothing to hand over).
EXPECTED_ROWS = [64] + [64] * 3 + [33] * 12 + [16] * 12 + [20] * 6 + [30] * 6


def test_the_exact_b_p_of_every_job_through_a_wrong_plan_and_a_competing_load():
    clock, model = SimClock(), mlp()
    sam, worker = make_sam(model, clock, wrong_plan_then_load)  # b_p None: the whole batch, 64
    with sam:
        train(sam, batches((6,), steps=STEPS, batch=B))
        stats = sam.stats()
    assert worker.rows == EXPECTED_ROWS
    assert stats.perturbation_batch_size_trajectory == EXPECTED_TRAJECTORY
    # rho follows b_p through the default rule, job by job, also after every change of b_p.
    assert worker.rhos == [DEFAULT_RHO_RULE.rho_for(RHO, rows, B) for rows in EXPECTED_ROWS]
    assert len(set(worker.rhos)) == len(set(EXPECTED_ROWS))
    assert stats.rho_applied == DEFAULT_RHO_RULE.rho_for(RHO, 30, B)
    assert stats.perturbation_batch_size == 30 and stats.staleness_histogram == {0: 1, 1: STEPS - 1}


def test_every_change_is_logged(caplog):
    clock, model = SimClock(), mlp()
    sam, _ = make_sam(model, clock, wrong_plan_then_load)
    with caplog.at_level(logging.INFO, logger="asam_tune.runtime.adaptation"), sam:
        train(sam, batches((6,), steps=STEPS, batch=B))
    changes = [r.getMessage().split(":")[0] for r in caplog.records]
    assert changes == ["b_p 64 -> 33 after step 2", "b_p 33 -> 16 after step 14",
                       "b_p 16 -> 20 after step 26", "b_p 20 -> 30 after step 32"]


def test_steps_computed_on_the_spot_are_not_fed():
    # Two epochs of 8 steps: the first step of each is synchronous (not fed), so 14 of the 16
    # steps are observed. A b_p of 64 is late on every fed step: the second late one shrinks it.
    clock, model = SimClock(), mlp()
    sam, worker = make_sam(model, clock, lambda step, b: 1.0 + b / 4.0)
    data = batches((6,), steps=8, batch=B)
    with sam:
        train(sam, data)
        train(sam, data)
        stats = sam.stats()
    # Epoch 1: steps 1, 2 late -> 33 after step 2; 33 fits (idle 0.75): no more change. Epoch
    # 2's first step is synchronous with b_p 33 (9.25 of simulated time, not a wait).
    assert stats.perturbation_batch_size_trajectory == ((0, 64), (2, 33))
    assert worker.rows == [64] + [64] * 3 + [33] * 4 + [33] + [33] * 7
    assert sam._feed.adapter.steps == 14


def test_non_blocking_counts_a_result_missing_at_its_step_as_the_wait_it_would_have_cost():
    # Non-blocking never waits: a job of 64 (17 of 10) is collected one step late and the next
    # handed over then; each counts as a late step (waited 7). Two of them: 64 -> 33 after
    # step 4, and from step 6 a job is handed over every step.
    clock, model = SimClock(), mlp()
    sam, worker = make_sam(model, clock, lambda step, b: 1.0 + b / 4.0, staleness="non_blocking")
    with sam:
        train(sam, batches((6,), steps=12, batch=B))
        stats = sam.stats()
    assert worker.rows == [64] + [64, 64, 64] + [33] * 5  # handed over in steps 0, 2, 4, then 6-10
    assert stats.perturbation_batch_size_trajectory == ((0, 64), (4, 33))
    # Steps 1, 3 and 5 go on with the newest result there is (computed at w_0, w_0, w_2);
    # steps 2, 4 and 6 apply the late one (w_0, w_2, w_4); from step 7 each is one step stale.
    assert stats.staleness_histogram == {0: 1, 1: 6, 2: 3, 3: 2}


# ----------------------------------------------------------------------------- defaults and errors


def _plan(mode="staleness1", batch_size=None):
    plan = SimpleNamespace(perturbation=SimpleNamespace(device="cpu", threads=1, cores=(1,)),
                           perturbation_batch_size=48, mode=mode, profile_fingerprint=None)
    if batch_size is not None:
        plan.batch_size = batch_size
    return plan


def test_adaptation_is_off_without_a_plan():
    clock, model = SimClock(), mlp()
    worker = SimulatedWorker(clock, lambda step, b: 1.0 + b / 4.0)  # late at every step
    with AsyncSAM(model, sgd(model), timed_loss(clock), rho=RHO, perturber=worker, clock=clock) as sam:
        train(sam, batches((6,), steps=12, batch=B))
        stats = sam.stats()
    assert set(worker.rows) == {B} and stats.perturbation_batch_size_trajectory == ()


@pytest.mark.parametrize("mode, staleness, adapting", [
    ("staleness1", None, True), ("non_blocking", None, False), ("staleness1", 0, False),
    ("synchronous", None, False),
])
def test_on_by_default_with_a_plan_at_staleness_1_only(mode, staleness, adapting):
    clock, model = SimClock(), mlp()
    worker = SimulatedWorker(clock, lambda step, b: 1.0 + b / 4.0)
    with AsyncSAM(model, sgd(model), timed_loss(clock), rho=RHO, plan=_plan(mode, batch_size=B),
                  perturber=worker, clock=clock, staleness=staleness) as sam:
        assert (sam._feed is not None) == adapting
        if adapting:
            assert sam._feed.settings == AdaptationSettings()


def test_the_plan_s_batch_size_bounds_growth_and_an_idle_worker_grows_b_p():
    clock, model = SimClock(), mlp()
    worker = SimulatedWorker(clock, lambda step, b: 1.0)  # always idles 90%
    with AsyncSAM(model, sgd(model), timed_loss(clock), rho=RHO, plan=_plan(batch_size=56),
                  perturber=worker, clock=clock, adapt=SMALL) as sam:
        # The plan's b_p 48 of 56 is rescaled to the batches' 64 (with a warning): 55.
        with pytest.warns(RuntimeWarning, match="b_p scaled from 48 to 55"):
            train(sam, batches((6,), steps=12, batch=B))
        stats = sam.stats()
    # 55 -> min(56, 2 * 55, floor(55 * .9 * 10 / 1)) = 56 after the first full window (steps 1-4).
    assert stats.perturbation_batch_size_trajectory == ((0, 55), (4, 56))
    assert worker.rows == [55] * 6 + [56] * 6


@pytest.mark.parametrize("kwargs, bad", [
    ({"staleness": 0, "adapt": True}, "staleness 0"),
    ({"staleness": 0, "adapt": SMALL}, "staleness 0"),
    ({"adapt": "yes"}, "yes"),
    ({"adapt": AdaptationSettings(cooldown=0)}, "cooldown: 0"),
    ({"clock": 3.0}, "3.0"),
])
def test_invalid_adaptation_arguments_are_one_line_errors(kwargs, bad):
    model = mlp()
    worker = SimulatedWorker(SimClock(), lambda step, b: 1.0)
    with pytest.raises(UserInputError) as info:
        AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO, perturber=worker, **kwargs)
    assert bad in str(info.value) and "\n" not in str(info.value)


def test_adapt_with_the_in_process_perturbation_is_an_error():
    model = mlp()
    with pytest.raises(UserInputError, match="in-process"):
        AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO, adapt=True)
    with AsyncSAM(model, sgd(model), F.cross_entropy, rho=0.0, adapt=True) as sam:  # no worker at all
        assert sam._feed is None


# ----------------------------------------------------------------------------- checkpoints


# After step 12: the job for step 13, the first late one under the load, is collected by the
# checkpoint, with the window half full of snug steps.
SPLIT = 13


def _checkpoint(model, sam) -> dict:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "sam": sam.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _continuing_run(data):
    clock, model = SimClock(), mlp()
    sam, worker = make_sam(model, clock, wrong_plan_then_load)
    with sam:
        for i, (x, y) in enumerate(sam.lookahead(data)):
            sam.step(x, y)
            if i == SPLIT - 1:
                _checkpoint(model, sam)  # written and not used: the run goes on
        return model, worker.rows, sam.stats()


def _resumed_run(data, drop_adapter=False):
    clock, model = SimClock(), mlp()
    sam, worker = make_sam(model, clock, wrong_plan_then_load)
    with sam:
        for i, (x, y) in enumerate(sam.lookahead(data)):
            sam.step(x, y)
            if i == SPLIT - 1:
                break
        checkpoint = _checkpoint(model, sam)
    rows = list(worker.rows)
    if drop_adapter:
        checkpoint["sam"]["adapter"] = None
    clock, resumed = SimClock(), mlp()
    resumed.load_state_dict(checkpoint["model"])
    sam, worker = make_sam(resumed, clock, wrong_plan_then_load)
    with sam:
        sam.load_state_dict(checkpoint["sam"])
        train(sam, data[SPLIT:])
        return resumed, rows + worker.rows, sam.stats()


def test_resume_with_adaptation_equals_the_run_that_checkpointed_and_went_on():
    data = batches((6,), steps=STEPS, batch=B)
    model, rows, stats = _continuing_run(data)
    resumed, resumed_rows, resumed_stats = _resumed_run(data)
    assert resumed_rows == rows and bitwise_equal(resumed, model)
    assert resumed_stats.perturbation_batch_size_trajectory == stats.perturbation_batch_size_trajectory
    # The checkpoint's collect is not a step: step 13 goes unobserved, so the second late step
    # is step 15 and the shrink comes one step later than in the run that never checkpointed.
    assert stats.perturbation_batch_size_trajectory == ((0, 64), (2, 33), (15, 16), (26, 20), (32, 30))
    assert rows == [64] + [64] * 3 + [33] * 13 + [16] * 11 + [20] * 6 + [30] * 6
    # Power: without the adapter's state the resumed run would start again from 16.
    _, _, fresh = _resumed_run(data, drop_adapter=True)
    assert fresh.perturbation_batch_size_trajectory != stats.perturbation_batch_size_trajectory


# ----------------------------------------------------------------------------- the benchmark's arithmetic


def test_benchmark_helpers_on_made_up_times():
    from asam_tune.bench.adapt import first_above, first_within, hiding_batch_size, rolling_ratios

    # Ascent 1 ms + 0.1 ms per sample: 40 samples fit in 5.05 ms; never more than B.
    medians = {b: 0.001 + 0.0001 * b for b in (10, 20, 40, 80)}
    assert hiding_batch_size(medians, 0.00505, 100) == 40
    assert hiding_batch_size(medians, 0.050, 100) == 100
    assert hiding_batch_size(medians, 0.0001, 100) == 1
    times = [2.0] * 3 + [1.0] * 3
    assert rolling_ratios(times, 1.0, window=3) == [None, None, 2.0, 2.0, 1.0, 1.0]
    ratios = [None, 1.5, 1.05, 1.2, 1.0]
    assert (first_within(ratios), first_above(ratios, 2), first_within(ratios, 3)) == (2, 3, 4)
    assert first_within([None, 1.2]) is None


def test_a_plan_file_gives_the_bound():
    from pathlib import Path

    from asam_tune.records import load_record
    from asam_tune.records.plan import Plan
    plan = load_record(Plan, Path(__file__).parent.parent / "fixtures" / "plan_v1.json")
    settings = settings_from_plan(plan)
    assert settings.training_batch_size == plan.batch_size and settings.batch_size <= plan.batch_size
