"""SyncBatchNorm in the ascent: replicas turn it rank-local, the in-process ascent borrows the plain forward.

The contract suite (tests/contract) checks every worker against a plain-BatchNorm reference
with a process group up and SyncBatchNorm's collective replaced by a counter; these are the
details around it.
"""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from asam_tune.perturbers.ascent import perturbed_indices
from asam_tune.perturbers.base import AscentJob, AscentTask
from asam_tune.perturbers.in_process import InProcessPerturber
from asam_tune.perturbers.local_norm import LocalBatchNorm, local_batch_norm
from asam_tune.perturbers.replica import replica_on


def sync_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_a_replica_is_rank_local_and_keeps_the_models_tensors_in_order(group):
    model = nn.SyncBatchNorm.convert_sync_batchnorm(sync_model(), process_group=group)
    replica = replica_on(model)
    assert isinstance(replica[1], LocalBatchNorm) and not isinstance(replica[1], nn.SyncBatchNorm)
    assert "process_group" not in replica[1].__dict__
    assert [n for n, _ in replica.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert [n for n, _ in replica.named_buffers()] == [n for n, _ in model.named_buffers()]
    assert type(model[1]) is nn.SyncBatchNorm  # the main model is not touched
    replica.train()
    x = torch.randn(8, 6)
    assert torch.equal(replica[1](x), F.batch_norm(x, None, None, model[1].weight, model[1].bias, True, 0.1,
                                                   model[1].eps))
    restored = pickle.loads(pickle.dumps(replica))  # what the CPU worker process receives
    assert isinstance(restored[1], LocalBatchNorm)
    with pytest.raises(ValueError, match="at least 2D"):
        replica[1](torch.randn(6))


def test_the_in_process_ascent_borrows_the_plain_forward_and_gives_it_back(group):
    model = sync_model().train()
    task = AscentTask(model, perturbed_indices(model, model.parameters()),
                      lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    perturber = InProcessPerturber(task)
    weights = [p.detach() for p in model.parameters()]
    perturber.submit(AscentJob(0, weights, (x, y), 0.05, 0))
    assert perturber.collect().perturbation is not None
    assert "forward" not in model[1].__dict__
    with pytest.raises(ValueError, match="expected input tensor to be on GPU"):
        model(x)  # outside the ascent, the main model still synchronises (here: refuses the CPU)

    def fails(m, b):
        m(b[0])
        raise KeyError("scripted")

    perturber = InProcessPerturber(AscentTask(model, task.perturbed, fails))
    with pytest.raises(KeyError):
        perturber.submit(AscentJob(1, weights, (x, y), 0.05, 0))
    assert "forward" not in model[1].__dict__


def test_a_forward_set_on_the_instance_before_is_put_back():
    norm = nn.SyncBatchNorm(3)
    mine = lambda x: x  # noqa: E731 - a user's own instance-level override
    norm.forward = mine
    with local_batch_norm([norm]):
        assert norm.forward is not mine
    assert norm.forward is mine
