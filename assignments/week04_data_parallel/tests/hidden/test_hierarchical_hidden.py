"""Hidden tests of `HierarchicalAllReduce` (task hierarchical_all_reduce).

Reference: the sum over the ranks, computed here. The student's class runs on each rank through the grader's hub
(`common.grading.ranks`), which carries out every collective itself and logs who called which one on which group:
the tests check the pattern, a reduce in the node to its leader, an all-reduce among the leaders, a broadcast in
the node from its leader, and nothing else (collectives in groups of one rank move nothing and are ignored).
"""

from __future__ import annotations

import pytest
import torch
from scenarios import hierarchical

from common.grading.client import Submission
from common.grading.ranks import Collective, RankRun

SHAPES = [(2, 1), (2, 2), (3, 1), (3, 3), (4, 1), (4, 2), (4, 4)]  # (world size, ranks per node)


def tensors(world_size: int, dtype: torch.dtype, calls: int = 2) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(world_size)
    if dtype.is_floating_point:
        return [
            [torch.randn(7, 3, generator=generator, dtype=dtype) for _ in range(calls)]
            for _ in range(world_size)
        ]
    return [
        [torch.randint(-1000, 1000, (11,), generator=generator) for _ in range(calls)]
        for _ in range(world_size)
    ]


def expected_pattern(rank: int, world_size: int, per_node: int) -> list[Collective]:
    leader = rank - rank % per_node
    node = tuple(range(leader, leader + per_node))
    leaders = tuple(range(0, world_size, per_node))
    pattern = [Collective("reduce", node, leader, "sum")]
    if rank == leader:
        pattern.append(Collective("all_reduce", leaders, None, "sum"))
    pattern.append(Collective("broadcast", node, leader, None))
    return [c for c in pattern if len(c.group) > 1]


def run(submission: Submission, per_node: int, inputs: list[list[torch.Tensor]]) -> RankRun:
    return RankRun.from_data(submission.run(hierarchical.all_reduce, per_node, inputs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
@pytest.mark.parametrize(("world_size", "per_node"), SHAPES)
def test_equals_all_reduce(
    submission: Submission, world_size: int, per_node: int, dtype: torch.dtype
) -> None:
    inputs = tensors(world_size, dtype)
    ran = run(submission, per_node, inputs)
    outputs = ran.returned(list[torch.Tensor])
    for call in range(len(inputs[0])):
        expected = sum(rank_inputs[call].double() for rank_inputs in inputs)
        for rank in range(world_size):
            ours = outputs[rank][call]
            assert ours.dtype == dtype and ours.shape == expected.shape, (
                f"rank {rank}, call {call}: a {ours.dtype} tensor of shape {list(ours.shape)}"
            )
            torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5,
                                       msg=f"rank {rank}, call {call}: not the sum over the ranks")  # fmt: skip
            assert torch.equal(ours, outputs[0][call]), f"rank {rank} and rank 0 differ after call {call}"


@pytest.mark.parametrize(("world_size", "per_node"), SHAPES)
def test_reduce_then_leaders_then_broadcast(submission: Submission, world_size: int, per_node: int) -> None:
    ran = run(submission, per_node, tensors(world_size, torch.float32))
    ran.returned(list[torch.Tensor])
    for rank in range(world_size):
        ours = [c for c in ran.collectives[rank] if len(c.group) > 1]
        expected = expected_pattern(rank, world_size, per_node) * 2  # two calls
        assert ours == expected, (
            f"{world_size} ranks, {per_node} per node: rank {rank} made {ours}, expected {expected}"
        )


@pytest.mark.parametrize(("world_size", "per_node"), [(4, 3), (3, 2), (2, 0)])
def test_a_node_size_that_does_not_divide_the_world(
    submission: Submission, world_size: int, per_node: int
) -> None:
    ran = RankRun.from_data(
        submission.run(hierarchical.all_reduce, per_node, tensors(world_size, torch.int64))
    )
    for rank, error in enumerate(ran.errors):
        assert error is not None and "ValueError" in error["kinds"], (
            f"rank {rank}: ranks_per_node={per_node} with {world_size} ranks must raise ValueError, got "
            f"{error['name'] if error else 'no error'}"
        )
        assert "ranks_per_node" in error["line"], f"rank {rank}: the message should name ranks_per_node"
