"""Hidden tests of `shard_indices` and `distributed_accuracy` (task distributed_eval).

The model is a lookup table that records every batch it is called on (`scenarios/evaluation.py`), so the
accuracy of the whole dataset is known here exactly, and so is which samples each rank evaluated: every sample
exactly once, for dataset sizes above, equal to and below the world size.
"""

from __future__ import annotations

from typing import Any

import pytest
from scenarios import evaluation

from common.grading.client import Submission
from common.grading.ranks import RankRun

SHARD_CASES = [
    (size, world) for world in (1, 2, 3, 4, 5) for size in (0, 1, world - 1, world, world + 1, 17, 40)
]
# (dataset size, world size, batch size)
ACCURACY_CASES = [(1, 4, 3), (3, 4, 2), (7, 3, 2), (12, 4, 5), (13, 4, 3), (5, 2, 1), (9, 3, 100), (10, 1, 4)]


def expected_shards(size: int, world: int) -> list[list[int]]:
    base, extra = divmod(size, world)
    starts = [r * base + min(r, extra) for r in range(world + 1)]
    return [list(range(starts[r], starts[r + 1])) for r in range(world)]


def test_shards_are_contiguous_balanced_blocks(submission: Submission) -> None:
    ran = RankRun.from_data(submission.run(evaluation.shards, SHARD_CASES))
    (tables,) = ran.returned(list[list[list[int]]])
    assert len(tables) == len(SHARD_CASES), "one table per case expected"
    for (size, world), shards in zip(SHARD_CASES, tables, strict=True):
        flat = [i for shard in shards for i in shard]
        assert sorted(flat) == list(range(size)), (
            f"dataset size {size}, {world} ranks: the shards {shards} do not hold every index exactly once"
        )
        assert shards == expected_shards(size, world), (
            f"dataset size {size}, {world} ranks: shards {shards}, expected {expected_shards(size, world)}"
        )


@pytest.mark.parametrize(("size", "world_size", "batch_size"), ACCURACY_CASES)
def test_every_sample_exactly_once_and_the_exact_accuracy(
    submission: Submission, size: int, world_size: int, batch_size: int
) -> None:
    seed = size * 10 + world_size
    ran = RankRun.from_data(submission.run(evaluation.accuracy, size, world_size, seed, batch_size))
    per_rank = ran.returned(dict[str, Any])
    _, labels, predictions = evaluation.dataset(size, seed)
    expected = (predictions == labels).sum().item() / size
    shards = expected_shards(size, world_size)
    for rank, seen in enumerate(per_rank):
        assert type(seen["accuracy"]) is float, (
            f"rank {rank} returned {type(seen['accuracy']).__name__}, not float"
        )
        assert seen["accuracy"] == expected, (
            f"rank {rank} returned accuracy {seen['accuracy']!r}; the dataset's is {expected!r} ({size} samples, "
            f"{world_size} ranks)"
        )
        evaluated = [i for call in seen["calls"] for i in call]
        assert evaluated == shards[rank], (
            f"rank {rank} evaluated samples {evaluated}, expected its shard {shards[rank]}"
        )
        assert all(0 < len(call) <= batch_size for call in seen["calls"]), (
            f"rank {rank} called the model on batches of {[len(c) for c in seen['calls']]}, at most {batch_size}"
        )
        kinds = [c.kind for c in ran.collectives[rank]]
        assert kinds == ["all_reduce"], f"rank {rank} made {kinds}, expected one all_reduce of the counts"
