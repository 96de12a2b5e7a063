"""Runs in the submission's worker: the student's HierarchicalAllReduce on every rank, via the hub.

Each rank returns its tensor after each call; the hub's log says which collectives it made, on which group.
"""

from __future__ import annotations

import torch

from common.grading.ranks import run_ranks


def _all_reduce(ranks_per_node: int, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    from dataparallel.hierarchical import HierarchicalAllReduce

    all_reduce = HierarchicalAllReduce(ranks_per_node)
    return [all_reduce(tensor.clone()).clone() for tensor in tensors]


def all_reduce(ranks_per_node: int, tensors_per_rank: list[list[torch.Tensor]]) -> dict:
    """Rank r builds HierarchicalAllReduce(ranks_per_node) and calls it on each of tensors_per_rank[r]."""
    return run_ranks(_all_reduce, [(ranks_per_node, t) for t in tensors_per_rank], package="dataparallel")
