"""Hidden tests of prefetching (task prefetch): the collectives in FSDP2's order, step by step.

FSDP2 here is told to prefetch the next block in forward (`set_modules_to_forward_prefetch`) and prefetches
the next unit in backward by itself. The scenario marks the moment the first block starts computing with a
barrier. Forward prefetch: the second block's all-gather comes before that mark (issued in the first block's
pre-forward), not after. Backward prefetch: the next unit's all-gather comes before the current unit's
reduce-scatter. The hub's log of each phase must equal FSDP2's in order.
"""

from __future__ import annotations

import pytest
from fsdp2_runs import fsdp2, kinds, ours, returned, steps_of

from common.grading.client import Submission

STEPS = 2


@pytest.mark.parametrize("ranks", [2, 4])
def test_collectives_in_fsdp2s_order_with_prefetch(submission: Submission, ranks: int) -> None:
    mine, theirs = ours(submission, ranks, STEPS), fsdp2(ranks, STEPS)
    returned(mine)
    for rank in range(ranks):
        for step, (seen, expected) in enumerate(
            zip(steps_of(mine, rank, STEPS), steps_of(theirs, rank, STEPS), strict=True)
        ):
            for phase in ("before_first_block", "rest_of_forward", "backward"):
                got, want = kinds(getattr(seen, phase)), kinds(getattr(expected, phase))
                assert got == want, (
                    f"{ranks} ranks, rank {rank}, step {step + 1}, {phase.replace('_', ' ')}: {got}, expected "
                    f"{want} (the next unit gathered one step early, in forward and in backward)"
                )
