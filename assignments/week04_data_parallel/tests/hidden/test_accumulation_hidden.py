"""Hidden tests of `GradientAccumulator` (task grad_accumulation).

Reference: one process taking the same optimizer steps on the whole global batch (every rank's micro-batches of
the step, concatenated), computed here in float64. The student's accumulator runs on each rank through the
grader's hub (`common.grading.ranks`), which carries out every collective itself and so counts them where the
submission cannot reach: none on a micro-batch that does not step, exactly one on one that does.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from scenarios import accumulation
from torch import nn

from common.grading.client import Submission
from common.grading.ranks import RankRun

# (world size, micro-batches per step, steps, rows per micro-batch)
CASES = [(2, 3, 2, 4), (3, 1, 3, 2), (4, 2, 2, 3), (2, 4, 1, 5)]
TOLERANCE = {"rtol": 1e-9, "atol": 1e-10}


def reference_params(
    world_size: int, micro: int, steps: int, rows: int, seed: int
) -> list[list[torch.Tensor]]:
    """The parameters after each step of one process on the global batch of each step."""
    net = accumulation.model()
    optimizer = accumulation.optimizer(net)
    x, y = accumulation.batches(steps, world_size, micro, rows, seed)
    after = []
    for step in range(steps):
        optimizer.zero_grad()
        prediction = net(x[step].flatten(0, 2))
        nn.functional.mse_loss(prediction, y[step].flatten(0, 2)).backward()
        optimizer.step()
        after.append([p.detach().clone() for p in net.parameters()])
    return after


def run(submission: Submission, world_size: int, micro: int, steps: int, rows: int, seed: int,
        calls: int | None = None) -> tuple[RankRun, list[dict[str, Any]]]:  # fmt: skip
    ran = RankRun.from_data(submission.run(accumulation.train, steps, world_size, micro, rows, seed, calls))
    return ran, ran.returned(dict[str, Any])


@pytest.mark.parametrize(("world_size", "micro", "steps", "rows"), CASES)
def test_steps_equal_one_process_on_the_global_batch(
    submission: Submission, world_size: int, micro: int, steps: int, rows: int
) -> None:
    _, per_rank = run(submission, world_size, micro, steps, rows, seed=world_size + micro)
    expected = reference_params(world_size, micro, steps, rows, seed=world_size + micro)
    for rank, seen in enumerate(per_rank):
        flags = [(call + 1) % micro == 0 for call in range(steps * micro)]
        assert seen["stepped"] == flags, (
            f"rank {rank}: backward() returned {seen['stepped']}, expected {flags}"
        )
        assert len(seen["params"]) == steps, f"rank {rank} stepped {len(seen['params'])} times, not {steps}"
        for step, (ours, theirs) in enumerate(zip(seen["params"], expected, strict=True)):
            for p, q in zip(ours, theirs, strict=True):
                torch.testing.assert_close(
                    p, q, **TOLERANCE, msg=f"rank {rank}: parameters after step {step}"
                )


@pytest.mark.parametrize(("world_size", "micro", "steps", "rows"), CASES)
def test_one_all_reduce_per_step(
    submission: Submission, world_size: int, micro: int, steps: int, rows: int
) -> None:
    ran, _ = run(submission, world_size, micro, steps, rows, seed=1)
    for rank, log in enumerate(ran.collectives):
        kinds = [c.kind for c in log]
        assert kinds == ["all_reduce"] * steps, (
            f"rank {rank} made {kinds or 'no collectives'} over {steps} steps of {micro} micro-batches; "
            f"expected exactly one all_reduce per step ({steps})"
        )
        assert all(c.group == tuple(range(world_size)) for c in log), f"rank {rank} reduced on a subgroup"


@pytest.mark.parametrize(("world_size", "micro"), [(2, 3), (3, 4)])
def test_no_communication_before_the_step(submission: Submission, world_size: int, micro: int) -> None:
    """micro - 1 micro-batches: nothing may be communicated, and the parameters must not move."""
    ran, per_rank = run(submission, world_size, micro, steps=1, rows=3, seed=7, calls=micro - 1)
    initial = [p.detach() for p in accumulation.model().parameters()]
    for rank, seen in enumerate(per_rank):
        assert ran.count(rank) == 0, (
            f"rank {rank} made {[c.kind for c in ran.collectives[rank]]} in {micro - 1} micro-batches that do not "
            f"step (accumulation_steps={micro}); expected no communication"
        )
        assert seen["stepped"] == [False] * (micro - 1), f"rank {rank}: backward() returned {seen['stepped']}"
        for p, q in zip(seen["final"], initial, strict=True):
            assert torch.equal(p, q), f"rank {rank}'s parameters changed before the step"
