"""The models and losses of test_real_models.py that the CPU worker unpickles (by reference).

Here, not in the test module, so that a worker importing them imports torch only: the test
module imports pytest and transformers, about a second more per worker start. The Hugging Face
models are transformers' own classes; only their loss lives here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def hf_loss(model, batch):
    return model(**batch).loss


def xy_loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def sequence_loss(model, batch):
    """Next-token cross entropy over (N, T) token ids."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


class FrozenStemCNN(nn.Module):
    """A stem to freeze with its BatchNorm in eval mode, the usual fine-tuning recipe."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                  nn.Dropout(0.2), nn.Linear(4 * 4 * 4, 3))

    def forward(self, x):
        return self.head(self.stem(x))


class TiedLM(nn.Module):
    """Input embedding and output projection share one weight."""

    def __init__(self, vocab: int = 13, width: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.mix(self.embed(tokens))))


class GRUClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, 6, batch_first=True)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        out, _ = self.gru(x)
        return self.head(self.drop(out[:, -1]))
