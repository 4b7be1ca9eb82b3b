"""Models this project did not write, through AsyncSAM and its workers, against SAM written out here.

Hugging Face ViT and BERT (dict batches, attention masks) built from small configs with random
weights (no download), and the setups that used to go wrong: a CNN whose frozen stem and
eval-mode BatchNorm get their weights after AsyncSAM is built, tied weights, a GRU, dropout.

At staleness 0 AsyncSAM is synchronous SAM, and through the CPU worker it must equal the SAM
written out below within 1e-9 in float64: same perturbed set (the optimizer's parameters), same
rho (the rule's, for b_p of B), same dropout masks in the ascent (the job's seed), same modes
and buffers. At staleness 1 each model trains. Run with ``-s`` to see the table of differences.

The CPU worker unpickles the models and losses, so they live at module level, in real_models.py.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from asam_tune.perturbers.ascent import job_seed, seeded
from asam_tune.perturbers.batches import batch_size_of, slice_batch
from asam_tune.records.rho_rule import DEFAULT_RHO_RULE
from asam_tune.runtime import AsyncSAM
from tests.conformance.real_models import (FrozenStemCNN, GRUClassifier, TiedLM, hf_loss, sequence_loss,
                                             xy_loss)

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.timeout(300), pytest.mark.process, pytest.mark.slow]

RHO, LR, STEPS, SEED = 0.05, 0.02, 4, 1234
TOLERANCE = 1e-9


# ----------------------------------------------------------------------------- models and losses


def vit():
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32, num_labels=3,
                                    hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return transformers.ViTForImageClassification(config)


def bert():
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


def vit_batches(g):
    return [{"pixel_values": torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64),
             "labels": torch.randint(0, 3, (6,), generator=g)} for _ in range(STEPS + 1)]


def bert_batches(g):
    out = []
    for _ in range(STEPS + 1):
        mask = torch.ones(6, 10, dtype=torch.long)
        mask[:, 6:] = (torch.rand(6, 4, generator=g) < 0.5).long()  # padded tails of different lengths
        out.append({"input_ids": torch.randint(0, 40, (6, 10), generator=g), "attention_mask": mask,
                    "labels": torch.randint(0, 3, (6,), generator=g)})
    return out


def image_batches(g):
    return [(torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
            for _ in range(STEPS + 1)]


def token_batches(g):
    return [torch.randint(0, 13, (6, 7), generator=g) for _ in range(STEPS + 1)]


def sequence_batches(g):
    return [(torch.randn(6, 5, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (6,), generator=g))
            for _ in range(STEPS + 1)]


def load_weights_later(model: nn.Module) -> None:
    """After AsyncSAM is built: pretrained weights arrive, the stem is frozen with its BN in eval."""
    torch.manual_seed(99)
    donor = FrozenStemCNN().double()
    with torch.no_grad():
        for module in donor.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    model.load_state_dict(donor.state_dict())
    model.stem.eval()


CASES = {
    # name: (factory, loss, batches, frozen stem?)
    "hf-vit": (vit, hf_loss, vit_batches, False),
    "hf-bert": (bert, hf_loss, bert_batches, False),
    "cnn-frozen-stem-eval-bn": (FrozenStemCNN, xy_loss, image_batches, True),
    "tied-weights": (TiedLM, sequence_loss, token_batches, False),
    "gru": (GRUClassifier, xy_loss, sequence_batches, False),
}


def build(name: str):
    factory, loss, make_batches, frozen = CASES[name]
    torch.manual_seed(0)
    model = factory().double().train()
    if frozen:
        model.stem.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.9)
    return model, optimizer, loss, make_batches(torch.Generator().manual_seed(1)), frozen


# ----------------------------------------------------------------------------- the reference


def reference_sam(model, optimizer, loss, batches, bp: int, frozen: bool) -> None:
    """Synchronous SAM written out: the ascent at w_t on b_p samples of B_t, its seed; then the descent."""
    if frozen:
        load_weights_later(model)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    params = [p for p in model.parameters() if id(p) in held]
    for t, batch in enumerate(batches[:STEPS]):
        size = batch_size_of(batch)
        rho = DEFAULT_RHO_RULE.rho_for(RHO, bp, size)
        replica = copy.deepcopy(model)
        replica_params = [p for p, q in zip(replica.parameters(), model.parameters()) if id(q) in held]
        with seeded(job_seed(SEED, t)):
            ascent_loss = loss(replica, slice_batch(batch, bp))
        grads = torch.autograd.grad(ascent_loss, replica_params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(replica_params, grads)]
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        clean = [p.detach().clone() for p in params]
        optimizer.zero_grad()
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(rho * g / norm)
        loss(model, batch).backward()
        with torch.no_grad():
            for p, c in zip(params, clean):
                p.copy_(c)
        optimizer.step()


def max_difference(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa if sa[k].numel())


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", list(CASES))
def test_staleness_0_through_the_cpu_worker_equals_sam_written_out(name):
    model, optimizer, loss, batches, frozen = build(name)
    reference_model, reference_optimizer = copy.deepcopy(model), None
    reference_optimizer = torch.optim.SGD([p for p in reference_model.parameters() if p.requires_grad], lr=LR,
                                          momentum=0.9)
    bp = 3
    torch.manual_seed(7)  # the descent's dropout: the same global stream in both runs
    with AsyncSAM(model, optimizer, compute_loss=loss, rho=RHO, perturbation_device="cpu", staleness=0,
                  perturbation_batch_size=bp, seed=SEED, on_worker_failure="raise") as sam:
        if frozen:
            load_weights_later(model)
        for batch in batches[:STEPS]:
            sam.step(batch)
        stats = sam.stats()
    torch.manual_seed(7)
    reference_sam(reference_model, reference_optimizer, loss, batches, bp, frozen)
    difference = max_difference(model, reference_model)
    print(f"\n| {name} | CPU worker, staleness 0 | {difference:.1e} |")
    assert stats.fallbacks == 0 and stats.staleness_histogram == {0: STEPS}
    assert difference < TOLERANCE


def mean_loss(model: nn.Module, loss, batches) -> float:
    """The loss over every batch with dropout off (a copy in eval mode; the frozen stem is already)."""
    replica = copy.deepcopy(model).eval()
    with torch.no_grad():
        return sum(float(loss(replica, b)) for b in batches) / len(batches)


@pytest.mark.parametrize("name", list(CASES))
def test_staleness_1_through_the_cpu_worker_trains(name):
    model, optimizer, loss, batches, frozen = build(name)
    passes = 4
    with AsyncSAM(model, optimizer, compute_loss=loss, rho=RHO, perturbation_device="cpu", staleness=1,
                  perturbation_batch_size=3, seed=SEED, on_worker_failure="raise") as sam:
        if frozen:
            load_weights_later(model)
        before = mean_loss(model, loss, batches)
        for _ in range(passes):  # a few passes over the same batches: the loss on them must fall
            for batch in sam.lookahead(batches):
                assert math.isfinite(float(sam.step(batch)))
        stats = sam.stats()
    after = mean_loss(model, loss, batches)
    # One step per pass has no look-ahead (the last batch of a lookahead()): it is synchronous.
    assert stats.fallbacks == 0 and stats.staleness_histogram == {0: passes, 1: passes * (len(batches) - 1)}
    assert after < before
