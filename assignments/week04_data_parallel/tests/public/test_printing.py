"""Public tests of `dataparallel.printing`; the hidden tests also start the ranks in the least helpful order."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from conftest import on_ranks
from dataparallel.printing import print_in_rank_order


def two_calls() -> None:
    print_in_rank_order(f"hello from {dist.get_rank()}")
    print_in_rank_order("x" * (dist.get_rank() + 1))


@pytest.mark.parametrize("world_size", [2, 3])
def test_lines_come_in_rank_order(capfd: pytest.CaptureFixture[str], world_size: int) -> None:
    on_ranks(two_calls, world_size)
    lines = [f"rank {r} of {world_size}: hello from {r}" for r in range(world_size)]
    lines += [f"rank {r} of {world_size}: {'x' * (r + 1)}" for r in range(world_size)]
    assert capfd.readouterr().out.splitlines() == lines
