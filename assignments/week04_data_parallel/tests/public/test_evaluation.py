"""Public tests of `dataparallel.evaluation`: every sample exactly once, and the single-process accuracy."""

from __future__ import annotations

import pytest
import torch
from conftest import on_ranks
from dataparallel.evaluation import distributed_accuracy, shard_indices
from torch import nn


@pytest.mark.parametrize(("size", "world_size"), [(10, 3), (12, 4), (2, 3), (1, 1)])
def test_shards_cover_the_dataset_once(size: int, world_size: int) -> None:
    shards = [shard_indices(size, rank, world_size) for rank in range(world_size)]
    assert [i for shard in shards for i in shard] == list(range(size))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(11, 3, generator=generator)
    return x, torch.randint(0, 3, (11,), generator=generator)


def rank_accuracy() -> float:
    torch.manual_seed(0)
    return distributed_accuracy(nn.Linear(3, 3), *dataset(), batch_size=2)


def test_accuracy_equals_one_process() -> None:
    results = on_ranks(rank_accuracy, 3)
    torch.manual_seed(0)
    x, y = dataset()
    expected = (nn.Linear(3, 3)(x).argmax(-1) == y).sum().item() / len(y)
    assert results == {0: expected, 1: expected, 2: expected}
