"""The checker's side of every CPU task: FSDP2 run here, in the trusted process, as the expected values, and
the student's run read back, both split into the phases the scenario's markers delimit.

FSDP2 runs on ranks of the grader's hub forked from this process (which never imports the submission), the
same scenario function as the student's, so both are observed the same way and every expected value, down to
the order of the collectives, is FSDP2's own, never written out here.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

# Imported before the first run forks the ranks' zygote: each rank would otherwise import them again (seconds).
import torch._dynamo  # noqa: F401
import torch.distributed.fsdp  # noqa: F401
import torch.distributed.tensor  # noqa: F401
from scenarios import fsdp

import common.distributed.fsdp  # noqa: F401
from common.grading.client import Submission
from common.grading.faults import ReferenceRunError
from common.grading.ranks import Collective, RankRun

MARKERS_PER_STEP = (
    4  # the scenario's barriers: step start, inside the first block, forward done, backward done
)


class Step(NamedTuple):
    """One rank's collectives in one training step, split at the scenario's markers."""

    before_first_block: list[Collective]  # from the step's start until the first block computes
    rest_of_forward: list[Collective]
    backward: list[Collective]

    @property
    def forward(self) -> list[Collective]:
        return self.before_first_block + self.rest_of_forward


@functools.cache
def fsdp2(ranks: int, steps: int) -> RankRun:
    """FSDP2's run of the scenario (cached: the CPU tasks share this checker process)."""
    run = RankRun.from_data(fsdp.train(False, ranks, steps))
    if run.failure() is not None:
        raise ReferenceRunError(f"the grader's FSDP2 run on {ranks} ranks failed: {run.failure()}")
    return run


def ours(submission: Submission, ranks: int, steps: int) -> RankRun:
    return RankRun.from_data(submission.run(fsdp.train, True, ranks, steps))


def returned(run: RankRun) -> list[dict[str, Any]]:
    """Every rank's observations; AssertionError naming the first rank that failed (the student's message)."""
    return run.returned(dict[str, Any])


def steps_of(run: RankRun, rank: int, steps: int) -> list[Step]:
    """The rank's log cut at the markers: AssertionError if the submission made barriers of its own (the cut
    would be meaningless) or communicated between the steps (sharding, the optimizer's step)."""
    log = run.collectives[rank]
    cuts = [i for i, c in enumerate(log) if c.kind == "barrier"]
    kinds = [c.kind for c in log]
    assert len(cuts) == MARKERS_PER_STEP * steps, (
        f"rank {rank} made {len(cuts) - MARKERS_PER_STEP * steps} barriers of its own ({kinds}); expected none"
    )
    pieces = [log[a + 1 : b] for a, b in zip([-1, *cuts], [*cuts, len(log)], strict=True)]
    outside = [c.kind for k, piece in enumerate(pieces) if k % MARKERS_PER_STEP == 0 for c in piece]
    assert not outside, (
        f"rank {rank} communicated outside forward and backward ({outside}): sharding the model and the "
        "optimizer's step need no collective"
    )
    return [Step(*pieces[MARKERS_PER_STEP * s + 1 : MARKERS_PER_STEP * s + 4]) for s in range(steps)]


def kinds(collectives: list[Collective]) -> list[str]:
    return [c.kind for c in collectives]
