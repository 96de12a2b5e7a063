"""Hidden tests of the communication of `shard_model` (task collectives), counted by the grader's hub.

Per step and rank, what the hub logged must be what it logged for FSDP2 in the same scenario, as multisets
(their order is the prefetch task's): in the forward, one all-gather per unit (each unit gathered before its
forward); in the backward, one all-gather per unit again (freed after the forward, so gathered again for the
backward) and one reduce-scatter per unit, averaging (a sum of gradients divided by p beforehand, or AVG),
all on the group of every rank. An all-reduce of the gradients gives each rank the same numbers, but moves
twice the bytes and keeps whole gradients on every rank: it fails here, not in the parity task.
"""

from __future__ import annotations

from collections import Counter

import pytest
from fsdp2_runs import fsdp2, kinds, ours, returned, steps_of

from common.grading.client import Submission

STEPS = 2


@pytest.mark.parametrize("ranks", [2, 4])
def test_one_all_gather_per_unit_each_way_and_one_reduce_scatter_per_unit(
    submission: Submission, ranks: int
) -> None:
    mine, theirs = ours(submission, ranks, STEPS), fsdp2(ranks, STEPS)
    returned(mine)
    for rank in range(ranks):
        for step, (seen, expected) in enumerate(
            zip(steps_of(mine, rank, STEPS), steps_of(theirs, rank, STEPS), strict=True)
        ):
            for phase in ("forward", "backward"):
                got, want = Counter(kinds(getattr(seen, phase))), Counter(kinds(getattr(expected, phase)))
                assert got == want, (
                    f"{ranks} ranks, rank {rank}, step {step + 1}: the {phase} made {dict(got)}, expected "
                    f"{dict(want)} (one all-gather per unit in forward; in backward one all-gather and one "
                    "reduce-scatter per unit)"
                )
            for collective in seen.forward + seen.backward:
                assert collective.group == tuple(range(ranks)), (
                    f"rank {rank}: a {collective.kind} on ranks {list(collective.group)}, not on the mesh's group"
                )
                if collective.kind == "reduce_scatter_tensor":
                    assert collective.reduce in ("sum", "avg"), (
                        f"rank {rank}: the gradients are reduce-scattered with {collective.reduce}, not a sum or average"
                    )
