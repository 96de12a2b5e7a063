"""Hidden tests of freeing the gathered parameters (task freed).

The scenario keeps a reference to every whole parameter the forward computed with (forward pre-hooks that run
after yours, when the module's parameters are the gathered ones) and reads the bytes of their storage after
the forward and after the backward. FSDP2 frees each unit's gathered storage after its forward (root included,
with `loss` as its forward method) and after its backward: 0 bytes at both moments, which is what its run in
this checker reports and what yours must report. Dropping your own references is not freeing: autograd keeps
the tensors it saved for backward, and so does the scenario. These sizes are read inside the ranks (see
`scenarios/fsdp.py`); that every unit is gathered again for the backward is seen by the hub (task
collectives).
"""

from __future__ import annotations

import pytest
from fsdp2_runs import fsdp2, ours, returned

from common.grading.client import Submission

STEPS = 2


@pytest.mark.parametrize("ranks", [2, 4])
def test_gathered_storage_is_freed_after_forward_and_after_backward(
    submission: Submission, ranks: int
) -> None:
    seen, expected = returned(ours(submission, ranks, STEPS)), returned(fsdp2(ranks, STEPS))
    for rank in range(ranks):
        for step in range(STEPS):
            mine, theirs = seen[rank]["steps"][step], expected[rank]["steps"][step]
            assert mine["whole"] == theirs["whole"], (
                f"rank {rank}, step {step + 1}: the parameters the forward computed with were "
                f"{mine['whole']}, expected {theirs['whole']} ([a plain tensor, its whole shape] per parameter)"
            )
            for moment in ("bytes_after_forward", "bytes_after_backward"):
                kept = {name: size for name, size in mine[moment].items() if size != theirs[moment][name]}
                assert not kept, (
                    f"rank {rank}, step {step + 1}: {moment.removeprefix('bytes_').replace('_', ' ')}, the gathered "
                    f"storage of {sorted(kept)} holds {sorted(kept.values())} bytes; FSDP2 holds "
                    f"{sorted({theirs[moment][n] for n in kept})}"
                )
