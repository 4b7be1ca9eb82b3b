"""AsyncSAM against SAM written out by hand: synchronous, one-step-stale, accumulation, resume.

Everything runs in-process (``InProcessPerturber`` or a scripted fake perturber) in float64,
so the comparisons are exact up to the order of a few float operations (1e-12).
"""
from __future__ import annotations

import io
import pickle
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from asam_tune.errors import FingerprintMismatchError, UserInputError, WorkerError
from asam_tune.records import CpuInfo, Fingerprint
from asam_tune.runtime import AsyncSAM
from asam_tune.perturbers.ascent import parameters_at
from asam_tune.perturbers.base import AscentJob, AscentTask
from asam_tune.perturbers.in_process import InProcessPerturber
from asam_tune.records.rho_rule import DEFAULT_RHO_RULE, NO_RHO_RULE, RhoRule
from asam_tune.runtime.options import settings_from_plan
from asam_tune.runtime.workers import replicated_module

RHO = 0.1
LR = 0.05
BATCH = 8
STEPS = 20


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny float64 kernels: a second intra-op thread only adds contention on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def bn_convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 3)).double()


MODELS = {"mlp": (mlp, (6,)), "bn_convnet": (bn_convnet, (1, 6, 6))}


def batches(shape: tuple[int, ...], steps: int = STEPS, batch: int = BATCH, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (batch,), generator=g)) for _ in range(steps)]


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)


def max_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)


def bitwise_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- the reference


def ascent(model: nn.Module, weights: list[torch.Tensor], x, y, rho: float) -> list[torch.Tensor]:
    """rho * g / ||g|| at ``weights``; BatchNorm runs on cloned buffers (the model's stay put)."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: w.detach().clone().requires_grad_(True) for n, w in zip(names, weights)}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    loss = F.cross_entropy(functional_call(model, {**params, **buffers}, (x,)), y)
    grads = torch.autograd.grad(loss, list(params.values()))
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    return [rho * g / norm for g in grads]


def reference_sam(model, optimizer, data, rho, bp, lag, micro_batches=1):
    """SAM written out: step t applies e computed at w_{t - lag[t]} on the first bp samples of B_t.

    ``lag`` all 0 is synchronous SAM; [0, 1, 1, ...] is the one-step-stale schedule. With
    ``micro_batches`` k, B_t is split in k parts, the ascent uses the first part's first bp
    samples and the descent accumulates loss/k over the parts with the same e.
    """
    params = list(model.parameters())
    history = []
    for t, (x, y) in enumerate(data):
        current = [p.detach().clone() for p in params]
        history.append(current)
        xs, ys = x.chunk(micro_batches), y.chunk(micro_batches)
        e = ascent(model, history[t - lag[t]], xs[0][:bp], ys[0][:bp], rho)
        optimizer.zero_grad()
        for xm, ym in zip(xs, ys):
            with torch.no_grad():
                for p, ei in zip(params, e):
                    p.add_(ei)
            (F.cross_entropy(model(xm), ym) / micro_batches).backward()
            with torch.no_grad():
                for p, c in zip(params, current):
                    p.copy_(c)
        optimizer.step()


def run_async(model, data, *, staleness, bp=None, rho=RHO, optimizer=None, **kwargs):
    optimizer = optimizer or sgd(model)
    with AsyncSAM(model, optimizer, F.cross_entropy, rho=rho, staleness=staleness,
                  perturbation_batch_size=bp, **kwargs) as sam:
        for x, y in sam.lookahead(data):
            sam.step(x, y)
        return sam.stats()


# ----------------------------------------------------------------------------- a scripted worker


class ScriptedPerturber:
    """InProcessPerturber plus a script: record jobs, fail a collect, withhold readiness.

    The object is the factory AsyncSAM takes (``perturber=fake``): called with the run's
    ``AscentTask`` it builds its inner in-process perturber and returns itself, so the test
    keeps a handle on the jobs it saw.
    """

    def __init__(self, *, fail_on_collect=None, nonfinite=False, ready_every=1, reuse_buffers=False):
        self.inner: InProcessPerturber | None = None
        self.task: AscentTask | None = None
        self.reuse_buffers = reuse_buffers
        self.buffers = None
        self.jobs: list[tuple[int, torch.Tensor]] = []
        self.rhos: list[float] = []
        self.collects = 0
        self.polls = 0
        self.closed = False
        self.fail_on_collect = fail_on_collect
        self.nonfinite = nonfinite
        self.ready_every = ready_every

    def __call__(self, task: AscentTask) -> ScriptedPerturber:
        self.task = task
        self.inner = InProcessPerturber(task)
        if self.reuse_buffers:
            # Like ProcessPerturber: results are views of buffers overwritten by the next collect.
            self.buffers = [torch.empty_like(p) for p in parameters_at(task.model, task.perturbed)]
        return self

    def submit(self, job: AscentJob):
        x, _ = job.batch
        self.jobs.append((job.step, x.clone()))
        self.rhos.append(job.rho)
        self.polls = 0
        self.inner.submit(job)

    def ready(self):
        self.polls += 1
        return self.inner.ready() and self.polls % self.ready_every == 0

    def collect(self, timeout):
        assert timeout > 0
        self.collects += 1
        if self.collects == self.fail_on_collect:
            self.inner.close()
            raise WorkerError("perturbation worker died", pid=4242, signal=9)
        result = self.inner.collect(timeout)
        if self.nonfinite:
            result.perturbation = None
        if self.buffers is not None and result.perturbation is not None:
            for buffer, e in zip(self.buffers, result.perturbation):
                buffer.copy_(e)
            result.perturbation = list(self.buffers)
        return result

    def close(self):
        self.closed = True
        self.inner.close()


# ----------------------------------------------------------------------------- equal to the references


@pytest.mark.parametrize("name", sorted(MODELS))
def test_staleness0_equals_synchronous_sam(name):
    factory, shape = MODELS[name]
    data = batches(shape)
    model, reference = factory(), factory()
    run_async(model, data, staleness=0, bp=BATCH)
    reference_sam(reference, sgd(reference), data, RHO, BATCH, lag=[0] * STEPS)
    assert max_diff(model, reference) <= 1e-12


@pytest.mark.parametrize("name", sorted(MODELS))
def test_staleness1_equals_serial_one_step_stale_reference(name):
    factory, shape = MODELS[name]
    data = batches(shape)
    model, reference, synchronous = factory(), factory(), factory()
    # rho fixed: the reference applies RHO at b_p = 4 of 8 (the default rule would scale it).
    stats = run_async(model, data, staleness=1, bp=4, rho_rule="none")
    reference_sam(reference, sgd(reference), data, RHO, 4, lag=[0] + [1] * (STEPS - 1))
    assert max_diff(model, reference) <= 1e-12
    assert stats.staleness_histogram == {0: 1, 1: STEPS - 1}
    # The comparison has power: staleness 1 is measurably not synchronous SAM.
    reference_sam(synchronous, sgd(synchronous), data, RHO, 4, lag=[0] * STEPS)
    assert max_diff(model, synchronous) > 1e-6


def test_worker_gets_w_t_and_the_first_bp_samples_of_the_next_batch():
    data = batches((6,), steps=5)
    model = mlp()
    fake = ScriptedPerturber()
    run_async(model, data, staleness=1, bp=3, perturber=fake)
    # Step 0 computes e_0 on B_0 synchronously; during step t the worker gets (w_t, S_{t+1});
    # the last batch has no successor, so the last step hands the worker nothing.
    assert [step for step, _ in fake.jobs] == [0, 0, 1, 2, 3]
    expected_batches = [0, 1, 2, 3, 4]
    for (_, x), b in zip(fake.jobs, expected_batches):
        assert torch.equal(x, data[b][0][:3])
    assert fake.closed


@pytest.mark.parametrize("rho_rule, bp", [(None, 3), ("default", 2), (None, BATCH), ("none", 3),
                                          (RhoRule(kind="power", exponent=0.5, max_factor=4.0), 2)],
                         ids=["default_bp3", "default_named_bp2", "default_full_batch", "none", "custom"])
def test_the_rho_rule_sets_the_rho_of_every_job(rho_rule, bp):
    # rho is "rho at the full batch": by default a job of b_p < B samples gets the rule's larger
    # rho, every job alike, and stats() reports it.
    rule = rho_rule if isinstance(rho_rule, RhoRule) else NO_RHO_RULE if rho_rule == "none" else DEFAULT_RHO_RULE
    expected = rule.rho_for(RHO, bp, BATCH)
    if rule.kind != "none" and bp < BATCH:
        assert expected > RHO  # the check has power: the rule changes rho here
    else:
        assert expected == RHO
    data = batches((6,), steps=4)
    model = mlp()
    fake = ScriptedPerturber()
    with AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO, perturbation_batch_size=bp, rho_rule=rho_rule,
                  perturber=fake) as sam:
        assert sam.stats().rho_applied is None  # no job yet
        assert sam.rho_at(bp, BATCH) == expected
        for x, y in sam.lookahead(data):
            sam.step(x, y)
        assert sam.stats().rho_applied == expected
    assert fake.rhos == [expected] * len(data)


def test_the_default_rule_gives_the_reference_with_its_rho():
    # The same run as the fixed-rho comparison, under the default rule: equal to the reference
    # at the rule's rho, and measurably not the reference at the unscaled rho.
    data = batches((6,), steps=8)
    model, reference, unscaled = mlp(), mlp(), mlp()
    optimizer = sgd(model)
    with AsyncSAM(model, optimizer, F.cross_entropy, rho=RHO, perturbation_batch_size=4) as sam:
        rho = sam.rho_at(4, BATCH)
        for x, y in sam.lookahead(data):
            sam.step(x, y)
        assert sam.stats().rho_applied == rho == DEFAULT_RHO_RULE.rho_for(RHO, 4, BATCH)
    reference_sam(reference, sgd(reference), data, rho, 4, lag=[0] + [1] * 7)
    assert max_diff(model, reference) <= 1e-12
    reference_sam(unscaled, sgd(unscaled), data, RHO, 4, lag=[0] + [1] * 7)
    assert max_diff(model, unscaled) > 1e-6


def test_prefetch_before_perturbed_with_a_worker_that_reuses_its_buffers():
    # Step 0 then holds e_1 while e_0 is collected into the same worker buffers: AsyncSAM must
    # have copied e_1 first. Standalone prefetch() before perturbed() is the other explicit form.
    data = batches((6,))
    model, reference = mlp(), mlp()
    optimizer = sgd(model)
    with AsyncSAM(model, optimizer, F.cross_entropy, rho=RHO, perturbation_batch_size=4, rho_rule="none",
                  perturber=ScriptedPerturber(reuse_buffers=True)) as sam:
        for t, (x, y) in enumerate(data):
            if t + 1 < len(data):
                sam.prefetch(*data[t + 1])
            with sam.perturbed(x, y):
                F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            sam.finish_step()
    reference_sam(reference, sgd(reference), data, RHO, 4, lag=[0] + [1] * (STEPS - 1))
    assert max_diff(model, reference) <= 1e-12


def test_a_new_epoch_starts_with_a_synchronous_step():
    data = batches((6,), steps=3)
    model = mlp()
    fake = ScriptedPerturber()
    with AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO, perturber=fake) as sam:
        for _ in range(2):
            for x, y in sam.lookahead(data):
                sam.step(x, y)
        assert sam.stats().staleness_histogram == {0: 2, 1: 4}
    assert [step for step, _ in fake.jobs] == [0, 0, 1, 3, 3, 4]


@pytest.mark.parametrize("make_optimizer", [
    lambda m: torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9),
    lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
], ids=["sgd_momentum", "adam"])
def test_rho0_is_the_base_optimizer_bitwise(make_optimizer):
    data = batches((1, 6, 6))
    model, reference = bn_convnet(), bn_convnet()
    optimizer, ref_optimizer = make_optimizer(model), make_optimizer(reference)
    stats = run_async(model, data, staleness=1, rho=0.0, optimizer=optimizer)
    for x, y in data:
        ref_optimizer.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        ref_optimizer.step()
    assert bitwise_equal(model, reference)
    assert stats.steps == STEPS and stats.staleness_histogram == {}


def test_gradient_accumulation_reuses_e_t_and_equals_the_serial_reference():
    k, bp = 2, 3
    data = batches((1, 6, 6))
    model, reference = bn_convnet(), bn_convnet()
    optimizer = sgd(model)
    with AsyncSAM(model, optimizer, F.cross_entropy, rho=RHO, perturbation_batch_size=bp, rho_rule="none") as sam:
        for t, (x, y) in enumerate(data):
            xs, ys = x.chunk(k), y.chunk(k)
            optimizer.zero_grad()
            for i, (xm, ym) in enumerate(zip(xs, ys)):
                following = (data[t + 1][0].chunk(k)[0], data[t + 1][1].chunk(k)[0]) \
                    if i == 0 and t + 1 < len(data) else None
                with sam.perturbed(xm, ym, next_batch=following):
                    (F.cross_entropy(model(xm), ym) / k).backward()
            optimizer.step()
            sam.finish_step()
    reference_sam(reference, sgd(reference), data, RHO, bp, lag=[0] + [1] * (STEPS - 1), micro_batches=k)
    assert max_diff(model, reference) <= 1e-12


def test_amp_gradscaler_through_the_explicit_api_matches_step():
    # Power-of-two loss scale: scaling and unscaling are exact, so the GradScaler loop must
    # equal sam.step(); one scaler.step (hence one unscale_ and one optimizer step) per step.
    data = batches((1, 6, 6), steps=6)
    model, plain = bn_convnet(), bn_convnet()
    optimizer = sgd(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    optimizer_steps = []
    optimizer.register_step_post_hook(lambda *_: optimizer_steps.append(1))
    with AsyncSAM(model, optimizer, F.cross_entropy, rho=RHO, perturbation_batch_size=4) as sam:
        for t, (x, y) in enumerate(data):
            following = data[t + 1] if t + 1 < len(data) else None
            with sam.perturbed(x, y, next_batch=following):
                scaler.scale(F.cross_entropy(model(x), y)).backward()
            scaler.step(sam.base_optimizer)
            scaler.update()
            sam.base_optimizer.zero_grad()
            sam.finish_step()
    run_async(plain, data, staleness=1, bp=4)
    assert len(optimizer_steps) == len(data)
    assert max_diff(model, plain) <= 1e-12


def test_amp_bfloat16_autocast_on_cpu_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu")
    data = [(x.float(), y) for x, y in batches((6,), steps=4)]
    losses = []
    with AsyncSAM(model, optimizer, F.cross_entropy, rho=RHO) as sam:
        for t, (x, y) in enumerate(data):
            with sam.perturbed(x, y, next_batch=data[t + 1] if t + 1 < len(data) else None):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(x), y)
                scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            sam.finish_step()
            losses.append(loss.detach().float())
        assert sam.stats().skipped_perturbations == 0
    assert all(torch.isfinite(v) for v in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ----------------------------------------------------------------------------- the in-process ascent


class Uncopyable(nn.Sequential):
    """A model no replica can be made of: the in-process ascent must not need one."""

    def __deepcopy__(self, memo):
        raise TypeError("this model cannot be copied")

    def __reduce_ex__(self, protocol):
        raise TypeError("this model cannot be pickled")


def _task(model: nn.Module) -> AscentTask:
    from asam_tune.perturbers.ascent import perturbed_indices
    from asam_tune.perturbers.batches import OutputTargetLoss

    return AscentTask(model, perturbed_indices(model, model.parameters()), OutputTargetLoss(F.cross_entropy))


def test_in_process_ascent_runs_on_the_main_model_itself():
    torch.manual_seed(0)
    model = Uncopyable(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    data = batches((6,), steps=3)
    with AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO, staleness=0) as sam:
        for x, y in sam.lookahead(data):
            sam.step(x, y)
        assert sam.stats().staleness_histogram == {0: 3} and sam.stats().fallbacks == 0
    # Other weights than the model's are swapped in for the job and out again.
    x, y = data[0]
    params = list(model.parameters())
    clean = [p.detach().clone() for p in params]
    other = [p.detach() + 0.5 for p in params]
    perturber = InProcessPerturber(_task(model))
    perturber.submit(AscentJob(step=7, weights=other, batch=(x, y), rho=RHO, seed=0))
    assert perturber.ready()
    result = perturber.collect()
    assert result.step == 7 and not perturber.ready()
    expected = ascent(model, other, x, y, RHO)
    assert all((e - r).abs().max().item() <= 1e-12 for e, r in zip(expected, result.perturbation))
    assert all(torch.equal(p, c) for p, c in zip(params, clean))
    assert all(p.grad is None for p in params)  # .grad fields untouched


def test_in_process_ascent_puts_the_models_buffers_back():
    # The ascent's forward in train mode moves BatchNorm's running statistics; the main model's
    # statistics must move once per step (in the descent), so the ascent's writes are undone.
    model = bn_convnet()
    x, y = batches((1, 6, 6), steps=1)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    perturber = InProcessPerturber(_task(model))
    perturber.submit(AscentJob(step=0, weights=[p.detach() for p in model.parameters()], batch=(x, y), rho=RHO,
                               seed=0))
    result = perturber.collect()
    assert model.training and result.perturbation is not None
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []


# ----------------------------------------------------------------------------- perturb and restore


def test_perturb_then_restore_is_bit_identical_even_on_an_exception():
    model = bn_convnet()
    x, y = batches((1, 6, 6), steps=1)[0]
    clean = {k: v.clone() for k, v in model.state_dict().items()}
    with AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO) as sam:
        with sam.perturbed(x, y):
            assert any(not torch.equal(p, clean[n]) for n, p in model.named_parameters())
            # model.state_dict() inside the block still holds w_t, also as part of a parent ...
            assert all(torch.equal(v, clean[k]) for k, v in model.state_dict().items())
            parent = nn.ModuleDict({"net": model}).state_dict()
            assert all(torch.equal(parent[f"net.{k}"], v) for k, v in clean.items())
            pickle.loads(pickle.dumps(model))  # the hook does not stop torch.save(model)
            # ... and sam.state_dict() refuses.
            with pytest.raises(UserInputError, match="inside perturbed"):
                sam.state_dict()
        assert all(torch.equal(v, clean[k]) for k, v in model.state_dict().items())
        with pytest.raises(ZeroDivisionError):
            with sam.perturbed(x, y):
                1 / 0
        assert all(torch.equal(p, clean[n]) for n, p in model.named_parameters())


def test_a_step_retried_after_an_exception_equals_the_reference():
    data = batches((6,), steps=4)
    model, reference = mlp(), mlp()
    optimizer = sgd(model)
    with AsyncSAM(model, optimizer, F.cross_entropy, rho=RHO, perturbation_batch_size=4, rho_rule="none") as sam:
        for t, (x, y) in enumerate(data):
            following = data[t + 1] if t + 1 < len(data) else None
            attempts = 2 if t == 1 else 1
            for attempt in range(attempts):
                try:
                    with sam.perturbed(x, y, next_batch=following):
                        F.cross_entropy(model(x), y).backward()
                        if attempt < attempts - 1:
                            raise MemoryError("out of memory, try again")
                except MemoryError:
                    optimizer.zero_grad()
            optimizer.step()
            optimizer.zero_grad()
            sam.finish_step()
        with pytest.raises(UserInputError, match="different batches"):
            sam.prefetch(*data[0])
            sam.prefetch(*data[1])
    reference_sam(reference, sgd(reference), data, RHO, 4, lag=[0, 1, 1, 1])
    assert max_diff(model, reference) <= 1e-12


def test_optimizer_step_inside_perturbed_is_refused():
    model = mlp()
    x, y = batches((6,), steps=1)[0]
    with AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO) as sam:
        with pytest.raises(UserInputError, match="inside perturbed"):
            with sam.perturbed(x, y):
                F.cross_entropy(model(x), y).backward()
                sam.base_optimizer.step()


def test_missing_finish_step_is_caught():
    model = mlp()
    x, y = batches((6,), steps=1)[0]
    with AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO) as sam:
        with sam.perturbed(x, y):
            F.cross_entropy(model(x), y).backward()
        sam.base_optimizer.step()
        with pytest.raises(UserInputError, match="finish_step"):
            with sam.perturbed(x, y):
                pass
        with pytest.raises(UserInputError, match="finish_step"):
            sam.state_dict()


def test_nonfinite_perturbation_is_skipped_and_counted():
    data = batches((6,), steps=6)
    model, reference = mlp(), mlp()
    stats = run_async(model, data, staleness=1, perturber=ScriptedPerturber(nonfinite=True))
    optimizer = sgd(reference)
    for x, y in data:  # every perturbation skipped: plain SGD, bit for bit
        optimizer.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        optimizer.step()
    assert bitwise_equal(model, reference)
    assert stats.skipped_perturbations == len(data) and stats.staleness_histogram == {}


# ----------------------------------------------------------------------------- worker failure


def test_worker_failure_falls_back_once_and_continues_as_synchronous_sam():
    data = batches((1, 6, 6))
    model, reference = bn_convnet(), bn_convnet()
    fake = ScriptedPerturber(fail_on_collect=3)  # collects: e_0, e_1, then e_2 fails
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = run_async(model, data, staleness=1, bp=4, rho_rule="none", perturber=fake)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "pid 4242" in messages[0] and "signal 9" in messages[0]
    assert fake.closed and stats.fallbacks == 1
    # Steps 0 and 1 ran one step stale; step 2 (whose job failed) and later ones synchronous.
    reference_sam(reference, sgd(reference), data, RHO, 4, lag=[0, 1] + [0] * (STEPS - 2))
    assert max_diff(model, reference) <= 1e-12
    assert stats.staleness_histogram == {0: STEPS - 1, 1: 1}


def test_worker_failure_with_raise_reraises():
    data = batches((6,), steps=5)
    model = mlp()
    fake = ScriptedPerturber(fail_on_collect=2)
    with pytest.raises(WorkerError, match="died") as info:
        run_async(model, data, staleness=1, on_worker_failure="raise", perturber=fake)
    assert info.value.pid == 4242
    assert fake.closed


# ----------------------------------------------------------------------------- non-blocking


def test_non_blocking_never_waits_and_reports_the_staleness_used():
    data = batches((6,), steps=12)
    model = mlp()

    class NeverWaits(ScriptedPerturber):
        last_ready = False

        def ready(self):
            self.last_ready = super().ready()
            return self.last_ready

        def collect(self, timeout):
            # Only step 0's synchronous job (the first) may be collected without ready().
            assert self.last_ready or len(self.jobs) == 1, "non-blocking waited for a busy worker"
            self.last_ready = False
            return super().collect(timeout)

    fake = NeverWaits(ready_every=3)  # a job looks finished on every 3rd poll
    stats = run_async(model, data, staleness="non_blocking", bp=4, perturber=fake)
    assert sum(stats.staleness_histogram.values()) == len(data)
    assert max(stats.staleness_histogram) >= 2
    # Jobs were only handed over when the worker was idle: fewer jobs than steps.
    assert len(fake.jobs) < len(data)


# ----------------------------------------------------------------------------- checkpoints


def _train_with_checkpoint(factory, data, staleness, split):
    """Run ``split`` steps, checkpoint to bytes, resume on a fresh model and AsyncSAM."""
    model = factory()
    with AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO, staleness=staleness,
                  perturbation_batch_size=4) as sam:
        for i, (x, y) in enumerate(sam.lookahead(data)):
            sam.step(x, y)
            if i == split - 1:
                break
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "sam": sam.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = factory()
    with torch.no_grad():  # a "fresh" model: different weights until the checkpoint is loaded
        for p in resumed.parameters():
            p.add_(1.0)
    resumed.load_state_dict(checkpoint["model"])
    with AsyncSAM(resumed, sgd(resumed), F.cross_entropy, rho=RHO, staleness=staleness,
                  perturbation_batch_size=4) as sam:
        sam.load_state_dict(checkpoint["sam"])
        assert sam.step_count == split
        for x, y in sam.lookahead(data[split:]):
            sam.step(x, y)
        return resumed, sam.stats()


@pytest.mark.parametrize("staleness", [0, 1])
def test_resume_equals_straight_run_bitwise(staleness):
    data = batches((1, 6, 6))
    straight = bn_convnet()
    run_async(straight, data, staleness=staleness, bp=4)
    resumed, stats = _train_with_checkpoint(bn_convnet, data, staleness, STEPS // 2)
    assert bitwise_equal(resumed, straight)
    assert stats.steps == STEPS
    if staleness == 1:  # the pending e_10 was saved: no second synchronous step
        assert stats.staleness_histogram == {0: 1, 1: STEPS - 1}


def test_resume_without_the_pending_perturbation_would_differ():
    # The power check for the resume test: dropping the pending e_t changes the result.
    data = batches((1, 6, 6))
    straight = bn_convnet()
    run_async(straight, data, staleness=1, bp=4)
    original = AsyncSAM.state_dict

    def without_pending(self):
        state = original(self)
        state["pending"] = []
        return state

    AsyncSAM.state_dict = without_pending
    try:
        resumed, _ = _train_with_checkpoint(bn_convnet, data, 1, STEPS // 2)
    finally:
        AsyncSAM.state_dict = original
    assert max_diff(resumed, straight) > 1e-9


def test_load_state_dict_rejects_another_rho():
    model = mlp()
    with AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO) as sam:
        state = sam.state_dict()
    with AsyncSAM(model, sgd(model), F.cross_entropy, rho=0.2) as sam:
        with pytest.raises(UserInputError, match="0.1"):
            sam.load_state_dict(state)


def test_state_is_format_2_with_the_seed_and_format_1_still_loads():
    data = batches((6,), steps=3)
    model = mlp()
    with AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO, seed=3) as sam:
        for x, y in sam.lookahead(data):
            sam.step(x, y)
        state = sam.state_dict()
    assert state["format"] == 2 and state["seed"] == 3
    with AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO, seed=5) as sam:
        sam.load_state_dict(state)
        assert (sam.step_count, sam.seed) == (3, 3)  # the run's seed comes back
    old = {k: v for k, v in state.items() if k != "seed"}
    old["format"] = 1
    with AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO, seed=5) as sam:
        sam.load_state_dict(old)
        assert (sam.step_count, sam.seed) == (3, 5)  # format 1 had no seed: this object's stays
    with AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO) as sam:
        with pytest.raises(UserInputError, match="format 3"):
            sam.load_state_dict({**state, "format": 3})


# ----------------------------------------------------------------------------- surface


def test_param_groups_are_the_base_optimizers_and_schedulers_attach_to_it():
    model = mlp()
    optimizer = sgd(model)
    with AsyncSAM(model, optimizer, F.cross_entropy, rho=RHO) as sam:
        assert sam.param_groups is optimizer.param_groups and sam.base_optimizer is optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(sam.base_optimizer, step_size=1, gamma=0.5)
        for x, y in sam.lookahead(batches((6,), steps=2)):
            sam.step(x, y)
            scheduler.step()
        assert sam.param_groups[0]["lr"] == LR / 4


def test_step_returns_the_detached_loss_at_the_perturbed_weights():
    model = mlp()
    x, y = batches((6,), steps=1)[0]
    e = ascent(model, [p.detach() for p in model.parameters()], x, y, RHO)
    with torch.no_grad():
        expected = F.cross_entropy(functional_call(model, {n: p + ei for (n, p), ei in
                                                           zip(model.named_parameters(), e)}, (x,)), y)
    with AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO) as sam:
        loss = sam.step(x, y)
    assert not loss.requires_grad and abs(loss.item() - expected.item()) <= 1e-12


def test_close_is_idempotent_and_closes_the_worker():
    model = mlp()
    fake = ScriptedPerturber()
    sam = AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO, perturber=fake)
    sam.close()
    sam.close()
    assert fake.closed
    with pytest.raises(UserInputError, match="closed"):
        sam.step(*batches((6,), steps=1)[0])


def test_exception_inside_the_with_block_closes_the_worker():
    model = mlp()
    fake = ScriptedPerturber()
    with pytest.raises(RuntimeError, match="boom"):
        with AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO, perturber=fake):
            raise RuntimeError("boom")
    assert fake.closed


@pytest.mark.parametrize("kwargs, bad", [
    ({"rho": -0.1}, "-0.1"),
    ({"rho": float("nan")}, "nan"),
    ({"rho": True}, "True"),
    ({"staleness": 2}, "2"),
    ({"staleness": 1.0}, "1.0"),
    ({"staleness": "sometimes"}, "sometimes"),
    ({"perturbation_batch_size": 0}, "0"),
    ({"perturbation_batch_size": 2.5}, "2.5"),
    ({"on_worker_failure": "ignore"}, "ignore"),
    ({"worker_timeout_s": 0}, "0"),
    ({"perturbation_device": "tpu:0"}, "tpu:0"),
    ({"perturbation_device": 3}, "3"),
    ({"perturbation_device": "cuda:0"}, "cuda:0"),  # no CUDA here, or a model on the CPU
    ({"threads": 2}, "threads=2"),  # threads without a CPU worker
    ({"perturbation_device": "cpu", "cores": [0, 0]}, "(0, 0)"),
    ({"allow_other_machine": "yes"}, "yes"),
    ({"rho_rule": "sometimes"}, "sometimes"),
    ({"seed": 1.5}, "1.5"),
    ({"adaptive": "yes"}, "yes"),
    ({"perturber": "fake"}, "fake"),
    ({"worker_start_timeout_s": -1}, "-1"),
])
def test_invalid_arguments_are_one_line_errors_with_the_value(kwargs, bad):
    model = mlp()
    with pytest.raises(UserInputError) as info:
        AsyncSAM(model, sgd(model), F.cross_entropy, **kwargs)
    assert bad in str(info.value) and "\n" not in str(info.value)


def test_invalid_model_optimizer_and_loss():
    model = mlp()
    with pytest.raises(UserInputError, match="Optimizer"):
        AsyncSAM(model, torch.optim.SGD, F.cross_entropy)
    with pytest.raises(UserInputError, match="Module"):
        AsyncSAM("model", sgd(model), F.cross_entropy)
    with pytest.raises(UserInputError, match="callable"):
        AsyncSAM(model, sgd(model), "cross_entropy")
    with pytest.raises(UserInputError, match="exactly one of loss_fn"):
        AsyncSAM(model, sgd(model), F.cross_entropy, compute_loss=lambda m, b: m(b).sum())
    with pytest.raises(UserInputError, match="exactly one of loss_fn"):
        AsyncSAM(model, sgd(model))
    frozen = mlp().requires_grad_(False)
    with pytest.raises(UserInputError, match="no trainable"):
        AsyncSAM(frozen, torch.optim.SGD(mlp().parameters(), lr=LR), F.cross_entropy)


def test_loss_fn_rejects_batches_that_are_not_pairs_and_compute_loss_takes_them():
    # lookahead() yields any batch unchanged; loss_fn(model(x), y) needs (x, y) pairs and says so
    # at the first step, before any weight moved. compute_loss(model, batch) takes the same batches.
    model = mlp()
    clean = [p.detach().clone() for p in model.parameters()]
    loader = [torch.zeros(2, 6, dtype=torch.float64), torch.ones(2, 6, dtype=torch.float64)]
    with AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO) as sam:
        with pytest.raises(UserInputError, match="inputs, targets") as info:
            for batch in sam.lookahead(loader):
                sam.step(batch)
        assert "Tensor" in str(info.value)  # names what it got
    assert all(torch.equal(p, c) for p, c in zip(model.parameters(), clean))
    with AsyncSAM(model, sgd(model), compute_loss=lambda m, x: m(x).square().mean(), rho=RHO) as sam:
        for batch in sam.lookahead(loader):
            sam.step(batch)
        assert sam.stats().steps == 2
    assert any(not torch.equal(p, c) for p, c in zip(model.parameters(), clean))


def test_the_not_a_pair_error_is_one_line():
    model = mlp()
    with AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO) as sam:
        with pytest.raises(UserInputError) as info:
            sam.step(torch.zeros(2, 6, dtype=torch.float64))
    assert "\n" not in str(info.value)


def _fake_plan(mode="staleness1", device="cpu", fingerprint=None):
    return SimpleNamespace(perturbation=SimpleNamespace(device=device, threads=2, cores=(0, 1)),
                           perturbation_batch_size=4, mode=mode, profile_fingerprint=fingerprint)


def test_plan_settings_and_explicit_arguments_override_them():
    settings = settings_from_plan(_fake_plan())
    assert (settings.device, settings.threads, settings.cores, settings.batch_size, settings.staleness) \
        == ("cpu", 2, (0, 1), 4, 1)
    assert settings_from_plan(_fake_plan(mode="synchronous")).device is None  # in-process
    model = mlp()
    with AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO, plan=_fake_plan(mode="synchronous")) as sam:
        assert (sam.staleness, sam.perturbation_batch_size) == (0, 4)
    with AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO, plan=_fake_plan(mode="synchronous"),
                  staleness="non_blocking", perturbation_batch_size=2) as sam:
        assert (sam.staleness, sam.perturbation_batch_size) == ("non_blocking", 2)
    with pytest.raises(UserInputError, match="often"):
        settings_from_plan(_fake_plan(mode="often"))


def test_plan_file_is_read_and_checked_against_this_machine():
    from pathlib import Path

    from asam_tune.records import load_record
    from asam_tune.records.plan import Plan

    path = Path(__file__).parent.parent / "fixtures" / "plan_v1.json"  # made on "Test CPU"
    settings = settings_from_plan(load_record(Plan, path))
    assert (settings.device, settings.threads, settings.cores, settings.batch_size, settings.staleness) \
        == ("cpu", 4, (1, 2, 3, 4), 15, 1)
    model = mlp()
    with pytest.raises(FingerprintMismatchError, match="Test CPU"):
        AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO, plan=str(path))


def test_plan_from_another_machine_is_refused_unless_allowed():
    elsewhere = Fingerprint(cpu=CpuInfo(model="A CPU this machine does not have", usable_cores=999))
    plan = _fake_plan(mode="synchronous", fingerprint=elsewhere)
    model = mlp()
    with pytest.raises(FingerprintMismatchError, match="allow_other_machine"):
        AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO, plan=plan)
    with AsyncSAM(model, sgd(model), F.cross_entropy, rho=RHO, plan=plan, allow_other_machine=True) as sam:
        assert sam.staleness == 0


def test_ddp_wrapped_model_single_rank_equals_the_reference(tmp_path):
    # The worker replicates DDP's inner module; the descent's backward is DDP's (one all-reduce).
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        data = batches((6,), steps=6)
        inner, reference = mlp(), mlp()
        model = nn.parallel.DistributedDataParallel(inner)
        all_reduces = []

        def counting_hook(state, bucket):
            all_reduces.append(1)
            return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])

        model.register_comm_hook(None, counting_hook)
        run_async(model, data, staleness=1, bp=4, rho_rule="none", optimizer=sgd(model))
        reference_sam(reference, sgd(reference), data, RHO, 4, lag=[0] + [1] * 5)
        assert max_diff(inner, reference) <= 1e-12
        assert len(all_reduces) == len(data)  # the descent's only: the ascent joins no collective
        assert replicated_module(model) is inner  # what the worker copies (a DDP cannot be sent)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.parametrize("worker", ["secondary_stream", "second_gpu"])
def test_stream_worker_staleness1_equals_the_serial_reference(worker):
    if worker == "second_gpu" and torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    main = torch.device("cuda", 0)
    data = [(x.to(main), y.to(main)) for x, y in batches((1, 6, 6), steps=10)]
    model, reference = bn_convnet().to(main), bn_convnet().to(main)
    device = "cuda:0" if worker == "secondary_stream" else "cuda:1"
    stats = run_async(model, data, staleness=1, bp=4, rho_rule="none", perturbation_device=device)
    torch.cuda.synchronize()
    reference_sam(reference, sgd(reference), data, RHO, 4, lag=[0] + [1] * 9)
    assert max_diff(model, reference) <= 1e-10
    assert stats.staleness_histogram == {0: 1, 1: 9} and stats.fallbacks == 0
