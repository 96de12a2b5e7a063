"""Public test of `dataparallel.hierarchical`; the hidden tests also check which collectives each rank made."""

from __future__ import annotations

import torch
import torch.distributed as dist
from conftest import on_ranks
from dataparallel.hierarchical import HierarchicalAllReduce


def rank_sums() -> torch.Tensor:
    all_reduce = HierarchicalAllReduce(ranks_per_node=2)
    return all_reduce(torch.arange(5.0) * 10 ** dist.get_rank())


def test_equals_all_reduce_on_two_nodes_of_two() -> None:
    results = on_ranks(rank_sums, 4)
    expected = torch.arange(5.0) * (1 + 10 + 100 + 1000)
    for rank in range(4):
        torch.testing.assert_close(results[rank], expected)
