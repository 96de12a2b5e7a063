"""Runs in the submission's worker: `shard_indices` and `distributed_accuracy`, via the hub.

The model is a lookup table: its input's first column is the sample's index, and it predicts the class the
table holds for it, recording every batch it is called on. So the checker knows every prediction exactly,
and sees which samples each rank evaluated.
"""

from __future__ import annotations

import torch
from torch import nn

from common.grading.ranks import run_ranks


class LookupModel(nn.Module):
    """Predicts table[index] for each row (index = the row's first value); records the indices of each call."""

    def __init__(self, table: torch.Tensor, classes: int) -> None:
        super().__init__()
        self.table, self.classes = table, classes
        self.calls: list[list[int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = x[:, 0].long()
        self.calls.append(index.tolist())
        return nn.functional.one_hot(self.table[index], self.classes).double() + 0.1 * x[:, 1:2]


def dataset(size: int, seed: int, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, labels, predictions): inputs' first column is the index; about half the predictions right."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (size,), generator=generator)
    wrong = torch.rand(size, generator=generator) < 0.5
    predictions = torch.where(wrong, (labels + 1) % classes, labels)
    inputs = torch.cat(
        [torch.arange(size, dtype=torch.float64)[:, None], torch.zeros(size, 1, dtype=torch.float64)], 1
    )
    return inputs, labels, predictions


def _accuracy(size: int, seed: int, batch_size: int) -> dict:
    from dataparallel.evaluation import distributed_accuracy

    inputs, labels, predictions = dataset(size, seed)
    model = LookupModel(predictions, 3)
    accuracy = distributed_accuracy(model, inputs, labels, batch_size)
    return {"accuracy": accuracy, "calls": model.calls}


def accuracy(size: int, world_size: int, seed: int, batch_size: int) -> dict:
    """distributed_accuracy on every rank of `world_size`."""
    return run_ranks(_accuracy, [(size, seed, batch_size)] * world_size, package="dataparallel")


def _shards(cases: list[tuple[int, int]]) -> list[list[list[int]]]:
    from dataparallel.evaluation import shard_indices

    return [[shard_indices(size, rank, world) for rank in range(world)] for size, world in cases]


def shards(cases: list[tuple[int, int]]) -> dict:
    """shard_indices(size, rank, world) for every rank of every (size, world) case, on one rank."""
    return run_ranks(_shards, [(cases,)], package="dataparallel")
