"""AsyncSAM with the batches, losses and optimizers real training scripts use (in-process and fake workers).

Any batch structure with ``compute_loss``; the peeked batch reaching the worker through the
explicit ``perturbed()`` API; the perturbed set being the optimizer's parameters; a trainable
set that changes mid-run; adaptive SAM; the rho rule; the seed of the ascent's dropout.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asam_tune.errors import UserInputError
from asam_tune.perturbers.ascent import job_seed, seeded
from asam_tune.perturbers.batches import batch_size_of, flatten, slice_batch, unflatten
from asam_tune.perturbers.fake import FakePerturber
from asam_tune.records.rho_rule import DEFAULT_RHO_RULE, NO_RHO_RULE, RhoRule
from asam_tune.runtime import AsyncSAM

RHO, LR = 0.1, 0.05


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.drop = nn.Dropout(0.25)
        self.head = nn.Linear(8, 3)

    def forward(self, features, mask):
        return self.head(self.drop(torch.tanh(self.body(features * mask))))


def dict_loss(model, batch):
    return F.cross_entropy(model(batch["x"]["features"], batch["x"]["mask"]), batch["labels"])


def dict_batches(n: int = 6, rows: int = 8):
    g = torch.Generator().manual_seed(3)
    return [{"x": {"features": torch.randn(rows, 4, generator=g, dtype=torch.float64),
                   "mask": (torch.rand(rows, 4, generator=g) > 0.2).double()},
             "labels": torch.randint(0, 3, (rows,), generator=g), "source": "generated"} for _ in range(n)]


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return DictNet().double()


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


# ----------------------------------------------------------------------------- batches


def test_slicing_takes_the_first_rows_of_every_tensor_leaf_and_keeps_the_rest():
    batch = dict_batches(1)[0]
    batch["scalar"] = torch.tensor(2.0)
    cut = slice_batch(batch, 3)
    assert cut["x"]["features"].shape == (3, 4) and cut["labels"].shape == (3,)
    assert cut["source"] == "generated" and cut["scalar"].dim() == 0
    assert batch_size_of(batch) == 8
    leaves, spec = flatten(batch)
    rebuilt = unflatten(spec, leaves)
    assert rebuilt["x"]["mask"] is batch["x"]["mask"] and rebuilt["source"] == "generated"
    with pytest.raises(UserInputError, match="no tensor with a batch dimension"):
        batch_size_of({"a": "text"})


def test_a_dict_batch_with_compute_loss_equals_sam_written_out():
    data = dict_batches()
    model, reference = make_net(), make_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    torch.manual_seed(5)
    with AsyncSAM(model, optimizer, compute_loss=dict_loss, rho=RHO, staleness=0, perturbation_batch_size=4,
                  seed=77) as sam:
        for batch in data:
            sam.step(batch)
    torch.manual_seed(5)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=LR)
    for t, batch in enumerate(data):
        replica = copy.deepcopy(reference)
        with seeded(job_seed(77, t)):
            grads = torch.autograd.grad(dict_loss(replica, slice_batch(batch, 4)), list(replica.parameters()))
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        rho = DEFAULT_RHO_RULE.rho_for(RHO, 4, 8)
        clean = params_of(reference)
        ref_optimizer.zero_grad()
        with torch.no_grad():
            for p, g in zip(reference.parameters(), grads):
                p.add_(rho * g / norm)
        dict_loss(reference, batch).backward()
        with torch.no_grad():
            for p, c in zip(reference.parameters(), clean):
                p.copy_(c)
        ref_optimizer.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert (a - b).abs().max().item() < 1e-12


def test_lookahead_hands_the_peeked_batch_to_the_worker_in_the_explicit_api():
    data = dict_batches()
    model = make_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    workers = []

    def factory(task):
        workers.append(FakePerturber(task))
        return workers[-1]

    with AsyncSAM(model, optimizer, compute_loss=dict_loss, rho=RHO, staleness=1, perturber=factory) as sam:
        for batch in sam.lookahead(data):
            optimizer.zero_grad()
            with sam.perturbed(batch):  # no next_batch: the peeked one goes to the worker
                dict_loss(model, batch).backward()
            optimizer.step()
            sam.finish_step()
        stats = sam.stats()
    assert stats.staleness_histogram == {0: 1, 1: len(data) - 1}
    jobs = workers[0].jobs
    # Job t serves step t; from step 1 on it was made from batch t, peeked during step t - 1.
    for t, job in enumerate(jobs[1:], start=1):
        assert torch.equal(job.batch["labels"], data[t]["labels"])


def test_lookahead_with_accumulation_peeks_the_next_steps_first_micro_batch():
    data = dict_batches(n=8, rows=4)
    model = make_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    workers = []
    with AsyncSAM(model, optimizer, compute_loss=dict_loss, rho=RHO, staleness=1,
                  perturber=lambda task: workers.append(FakePerturber(task)) or workers[-1]) as sam:
        for i, batch in enumerate(sam.lookahead(data, accumulation_steps=2)):
            if i % 2 == 0:
                optimizer.zero_grad()
            with sam.perturbed(batch):
                (dict_loss(model, batch) / 2).backward()
            if i % 2 == 1:
                optimizer.step()
                sam.finish_step()
    served = [job.batch["labels"] for job in workers[0].jobs[1:]]
    assert [torch.equal(a, b["labels"]) for a, b in zip(served, data[2::2])] == [True] * 3


# ----------------------------------------------------------------------------- what is perturbed


def test_only_the_optimizers_parameters_are_perturbed_and_enter_the_norm():
    data = dict_batches()
    model = make_net()
    optimizer = torch.optim.SGD(model.head.parameters(), lr=LR)  # the body is trained elsewhere, or not
    body_before = params_of(model.body)
    workers = []
    with AsyncSAM(model, optimizer, compute_loss=dict_loss, rho=RHO, staleness=0,
                  perturber=lambda task: workers.append(FakePerturber(task)) or workers[-1]) as sam:
        sam.step(data[0])
    result_weights = workers[0].jobs[0].weights
    assert [w.shape for w in result_weights] == [p.shape for p in model.head.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(params_of(model.body), body_before))


def test_parameters_outside_the_model_are_descended_but_not_perturbed_with_one_warning():
    model = make_net()
    extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    optimizer = torch.optim.SGD([*model.parameters(), extra], lr=LR)
    with pytest.warns(RuntimeWarning, match="1 parameter.*not the model's"):
        sam = AsyncSAM(model, optimizer, compute_loss=dict_loss, rho=RHO, staleness=0)
    sam.close()


def test_an_optimizer_without_trainable_model_parameters_is_refused():
    model = make_net()
    model.requires_grad_(False)
    with pytest.raises(UserInputError, match="no trainable parameter"):
        AsyncSAM(model, torch.optim.SGD(model.parameters(), lr=LR), compute_loss=dict_loss, rho=RHO)


def test_a_trainable_set_that_changes_is_followed_with_a_restart():
    data = dict_batches()
    model = make_net()
    model.body.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    workers = []
    with AsyncSAM(model, optimizer, compute_loss=dict_loss, rho=RHO, staleness=1,
                  perturber=lambda task: workers.append(FakePerturber(task)) or workers[-1]) as sam:
        for batch in sam.lookahead(data[:3]):
            sam.step(batch)
        model.body.requires_grad_(True)  # unfreeze, the fine-tuning schedule's second phase
        optimizer.add_param_group({"params": list(model.body.parameters())})
        with pytest.warns(RuntimeWarning, match="parameters changed .4 perturbed now"):
            for batch in sam.lookahead(data[3:]):
                sam.step(batch)
    assert len(workers) == 2
    assert len(workers[1].jobs[0].weights) == 4 and len(workers[0].jobs[0].weights) == 2


# ----------------------------------------------------------------------------- rho, adaptive, seeds


def test_the_rho_rule_sets_the_rho_of_each_job():
    data = dict_batches()
    rule = RhoRule(kind="power", exponent=0.5, max_factor=1.8, source="test")
    for given, expected in [(rule, rule.rho_for(RHO, 2, 8)), ("none", RHO), (None, DEFAULT_RHO_RULE.rho_for(RHO, 2, 8))]:
        model = make_net()
        workers = []
        with AsyncSAM(model, torch.optim.SGD(model.parameters(), lr=LR), compute_loss=dict_loss, rho=RHO,
                      perturbation_batch_size=2, rho_rule=given,
                      perturber=lambda task: workers.append(FakePerturber(task)) or workers[-1]) as sam:
            sam.step(data[0])
            assert sam.stats().rho_applied == pytest.approx(expected)
        assert workers[0].jobs[0].rho == pytest.approx(expected)
    assert NO_RHO_RULE.rho_for(RHO, 1, 100) == RHO
    with pytest.raises(UserInputError, match="rho_rule"):
        AsyncSAM(make_net(), torch.optim.SGD(make_net().parameters(), lr=LR), compute_loss=dict_loss, rho_rule="big")


def test_adaptive_sam_scales_the_perturbation_by_the_weights():
    model = make_net()
    batch = dict_batches(1)[0]
    workers = []
    with AsyncSAM(model, torch.optim.SGD(model.parameters(), lr=0.0), compute_loss=dict_loss, rho=RHO,
                  staleness=0, adaptive=True, rho_rule="none", seed=5,
                  perturber=lambda task: workers.append(FakePerturber(task)) or workers[-1]) as sam:
        sam._choose_perturbation(batch)  # noqa: SLF001 - the perturbation itself, before any step
        e = sam._schedule.held[0].perturbation
    params = list(model.parameters())
    replica = copy.deepcopy(model)
    with seeded(job_seed(5, 0)):
        grads = torch.autograd.grad(dict_loss(replica, batch), list(replica.parameters()))
    norm = torch.sqrt(sum(((p.abs() * g) ** 2).sum() for p, g in zip(params, grads)))
    for got, p, g in zip(e, params, grads):
        assert torch.allclose(got, RHO * p.detach() ** 2 * g / norm, atol=1e-14, rtol=0)


def test_two_seeded_runs_with_dropout_are_identical_and_another_seed_is_not():
    def run(seed):
        torch.manual_seed(0)
        model = make_net()
        with AsyncSAM(model, torch.optim.SGD(model.parameters(), lr=LR), compute_loss=dict_loss, rho=RHO,
                      staleness=1, seed=seed, perturber=FakePerturber) as sam:
            for batch in sam.lookahead(dict_batches()):
                sam.step(batch)
        return params_of(model)

    first, second, other = run(1), run(1), run(2)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert any(not torch.equal(a, b) for a, b in zip(first, other))


def test_the_default_seed_follows_torch_manual_seed_and_draws_nothing_from_it():
    torch.manual_seed(42)
    model = make_net()
    torch.manual_seed(42)
    state = torch.get_rng_state()
    sam = AsyncSAM(model, torch.optim.SGD(model.parameters(), lr=LR), compute_loss=dict_loss, rho=RHO)
    assert sam.seed == 42 and torch.equal(torch.get_rng_state(), state)
    sam.close()


def test_loss_fn_and_compute_loss_are_exclusive():
    model = make_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    with pytest.raises(UserInputError, match="exactly one of loss_fn"):
        AsyncSAM(model, optimizer, F.cross_entropy, compute_loss=dict_loss)
    with pytest.raises(UserInputError, match="exactly one of loss_fn"):
        AsyncSAM(model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sam = AsyncSAM(model, optimizer, compute_loss=dict_loss, rho=0.0)
    with pytest.raises(UserInputError, match="takes one batch"):
        sam.step(1, 2, 3)
    sam.close()


def test_a_plan_for_another_model_is_refused_with_the_fix():
    from asam_tune import api

    plan = api.plan_for(api.load_profile("profiles/cpu-2core-mnist1d-cnn.json"), 100, asynchronous=True)
    model = make_net()
    with pytest.raises(UserInputError, match="the plan is for model 'mnist1d-cnn'.*asam-tune profile --model"):
        AsyncSAM(model, torch.optim.SGD(model.parameters(), lr=LR), compute_loss=dict_loss, rho=RHO, plan=plan,
                 allow_other_machine=True)


def test_a_pair_whose_rows_differ_is_refused_before_any_worker_sees_it():
    model = nn.Linear(4, 3).double()
    with AsyncSAM(model, torch.optim.SGD(model.parameters(), lr=LR), F.cross_entropy, RHO, staleness=0) as sam:
        with pytest.raises(UserInputError, match=r"differ in rows \(8 != 7\)"):
            sam.step(torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (7,)))
