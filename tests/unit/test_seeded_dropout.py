"""``SeededDropout``: dropout's semantics, masks from the worker's own generator."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from asam_tune.perturbers.seeded_dropout import SeededDropout, use_seeded_dropout


def test_it_keeps_dropouts_semantics_and_repeats_with_the_seed():
    g = torch.Generator().manual_seed(0)
    drop = SeededDropout(0.25, g)
    x = torch.ones(200, 50)
    y = drop(x)
    kept = y != 0
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.75))  # inverted scaling, as nn.Dropout
    assert 0.7 < kept.float().mean().item() < 0.8
    g.manual_seed(0)
    assert torch.equal(drop(x), y)
    drop.eval()
    assert drop(x) is x
    assert torch.equal(SeededDropout(1.0, g)(x), torch.zeros_like(x))


@pytest.mark.parametrize("cls, dims", [(nn.Dropout1d, 1), (nn.Dropout2d, 2), (nn.Dropout3d, 3)])
def test_channel_dropout_zeroes_whole_channels(cls, dims):
    g = torch.Generator().manual_seed(1)
    module = nn.Sequential(cls(0.5))
    assert use_seeded_dropout(module, g) == 1 and isinstance(module[0], SeededDropout)
    x = torch.ones(4, 8, *([5] * dims))
    y = module(x).flatten(2)
    per_channel = y.amax(dim=2) == y.amin(dim=2)
    assert per_channel.all()  # a channel is all kept or all dropped
    assert (y == 0).any() and (y != 0).any()


def test_the_swap_keeps_modes_and_leaves_the_global_generator_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Sequential(nn.Dropout(0.1)))
    model[2].eval()
    g = torch.Generator().manual_seed(3)
    assert use_seeded_dropout(model, g) == 2
    assert model[1].training and not model[2][0].training
    before = torch.get_rng_state()
    model(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(torch.get_rng_state(), before)
