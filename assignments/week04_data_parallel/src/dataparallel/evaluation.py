"""Distributed evaluation that sees every sample exactly once, for any dataset size and world size.

Splitting a test set of n samples over W ranks is easy when W divides n. When it does not, the usual tools
cheat: `DistributedSampler` pads the last ranks' shards with samples from the start, so some samples count
twice, and `drop_last` drops the remainder, so some never count. Either way the "distributed accuracy" is not
the accuracy of the test set. Here every sample is evaluated exactly once: shards of nearly equal size (some
may be empty when n < W), and one all-reduce of the *counts* (correct, seen), never an average of the ranks'
accuracies, which would weigh a sample of a small shard more than one of a large shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def shard_indices(dataset_size: int, rank: int, world_size: int) -> list[int]:
    """The indices of the samples rank `rank` evaluates: one contiguous block of range(dataset_size).

    The blocks are in rank order and their sizes differ by at most one: with q, r = divmod(dataset_size,
    world_size), ranks 0 .. r-1 get q + 1 samples and the others q (as torch.tensor_split splits).
    Every index is in exactly one rank's block; a rank's block is empty when dataset_size < world_size.
    """
    # BEGIN SOLUTION: shard_indices: contiguous blocks in rank order, the first dataset_size % world_size ranks one longer
    base, extra = divmod(dataset_size, world_size)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (rank < extra)))
    # END SOLUTION


@torch.no_grad()
def distributed_accuracy(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    group: dist.ProcessGroup | None = None,
) -> float:
    """The accuracy of `model` on the whole dataset, computed by every rank of `group` together.

    Every rank holds the whole dataset (`inputs`, `labels`: n samples, n >= 1) and the same model, and
    evaluates only its shard (`shard_indices`), in consecutive batches of at most `batch_size` samples, in
    index order, without gradients; a rank with an empty shard does not call the model. A prediction is
    the argmax of the model's output over its last dimension. Exactly one collective: an all-reduce of the
    rank's (correct, evaluated) counts.

    Returns:
        correct / n over the whole dataset, the same float on every rank.
    """
    # BEGIN SOLUTION: distributed_accuracy: evaluate this rank's shard in batches, one all-reduce of (correct, seen) counts
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    shard = shard_indices(len(inputs), rank, world_size)
    correct = 0
    for start in range(0, len(shard), batch_size):
        batch = shard[start : start + batch_size]
        predictions = model(inputs[batch]).argmax(dim=-1)
        correct += int((predictions == labels[batch]).sum())
    counts = torch.tensor([correct, len(shard)], dtype=torch.int64)
    dist.all_reduce(counts, group=group)
    return counts[0].item() / counts[1].item()
    # END SOLUTION
