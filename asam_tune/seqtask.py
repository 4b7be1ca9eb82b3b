"""Marked-digit sequences and a small transformer that classifies them (the ``seq-transformer`` workload).

A second workload for the accuracy benchmarks, cheap on one CPU core and not a toy: the label
depends on two tokens whose positions change from sample to sample, so the model's class token
has to find them by attention and combine them. Each sample is ``length`` digits; exactly two of
them, at random positions, are *marked* (token ``10 + d`` instead of ``d``). The label is

    (first marked digit + second marked digit) mod 10

The ten plain digits around them are distractors. A model that only counts tokens is not
enough: the classifier must pair the two marked digits and add them modulo 10 (a 100-entry
table it has to generalise, not memorise). Generation is deterministic per seed (a private
``torch.Generator``; no global random state moves). Training labels can be flipped
(``asam_tune.data.flip_labels``) so that memorising the flipped ones hurts and SAM has room.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from asam_tune.errors import UserInputError
from asam_tune.workloads import encoder_blocks

NUM_CLASSES = 10
DIGITS = 10
MARKED_OFFSET = 10  # token of a marked digit d: MARKED_OFFSET + d
VOCABULARY = 20
MARKS = 2
DEFAULT_LENGTH = 12
DEFAULT_SEED = 7


class SequenceData(NamedTuple):
    """Token ids (N, length) int64 and labels (N,) int64, train and test."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def label_of(tokens: torch.Tensor) -> torch.Tensor:
    """The rule, read from the tokens alone: the sum of the marked digits modulo 10."""
    marked = tokens >= MARKED_OFFSET
    if not torch.all(marked.sum(dim=1) == MARKS):
        raise ValueError(f"every sequence needs exactly {MARKS} marked digits")
    return torch.where(marked, tokens - MARKED_OFFSET, 0).sum(dim=1) % NUM_CLASSES


def generate(num_samples: int, *, length: int = DEFAULT_LENGTH,
             seed: int = DEFAULT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` sequences and their clean labels; the same seed gives the same tensors."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise UserInputError(f"num_samples must be a positive integer, got {num_samples!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < MARKS:
        raise UserInputError(f"sequence length must be an integer >= {MARKS}, got {length!r}")
    generator = torch.Generator().manual_seed(int(seed))
    tokens = torch.randint(0, DIGITS, (num_samples, length), generator=generator)
    # MARKS distinct positions per row: the first columns of a random permutation of each row.
    positions = torch.argsort(torch.rand(num_samples, length, generator=generator), dim=1)[:, :MARKS]
    rows = torch.arange(num_samples).unsqueeze(1)
    tokens[rows, positions] += MARKED_OFFSET
    return tokens, label_of(tokens)


def sequence_dataset(*, num_train: int = 3500, num_test: int = 1000, length: int = DEFAULT_LENGTH,
                     seed: int = DEFAULT_SEED, label_noise: float = 0.0, noise_seed: int = 0) -> SequenceData:
    """Train and test sets cut from one generated stream; test labels always clean.

    Two samples can coincide by chance (12 digits, two marks: about 10^13 sequences); the
    split is by draw, as MNIST-1D's is.
    """
    from asam_tune.data import flip_labels

    for name, value in (("num_train", num_train), ("num_test", num_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserInputError(f"{name} must be a positive integer, got {value!r}")
    x, y = generate(num_train + num_test, length=length, seed=seed)
    y_train = y[:num_train]
    if label_noise:
        y_train, _ = flip_labels(y_train, label_noise, num_classes=NUM_CLASSES, seed=noise_seed)
    return SequenceData(x[:num_train].clone(), y_train.clone(), x[num_train:].clone(), y[num_train:].clone())


def example_batch(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real sequences for timing and profiling (the workload's example batch), from a fixed seed."""
    return generate(batch_size, seed=DEFAULT_SEED + 1)


class SequenceTransformer(nn.Module):
    """Token and position embeddings, a class token, pre-norm transformer layers, a linear head."""

    def __init__(self, num_classes: int = NUM_CLASSES, vocabulary: int = VOCABULARY,
                 length: int = DEFAULT_LENGTH, dim: int = 64, depth: int = 2, heads: int = 4,
                 mlp_ratio: float = 2.0):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, length + 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = encoder_blocks(dim, heads, mlp_ratio, depth)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed[:, : x.shape[1] + 1]
        return self.head(self.norm(self.blocks(x)[:, 0]))


def sequence_transformer(num_classes: int = NUM_CLASSES) -> SequenceTransformer:
    return SequenceTransformer(num_classes=num_classes)


def workload_factory() -> tuple[SequenceTransformer, object]:
    """For ``asam-tune profile --model asam_tune.seqtask:workload_factory``: the model and its batches."""
    return SequenceTransformer(), example_batch


__all__ = ["SequenceData", "SequenceTransformer", "sequence_transformer", "sequence_dataset", "generate",
           "label_of", "example_batch", "workload_factory", "NUM_CLASSES", "VOCABULARY", "DEFAULT_LENGTH", "MARKED_OFFSET"]
