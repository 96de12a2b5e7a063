"""Hidden tests of `SyncBatchNormFunction` and `SyncBatchNorm` (task sync_batchnorm).

Reference: nn.BatchNorm1d in float64 on the concatenation of every rank's slice, computed here, in the checker.
The student's code runs on each rank through the grader's hub (`common.grading.ranks`), which carries out every
collective itself and so counts them where the submission cannot reach: exactly one in forward and exactly one
in backward, on the group the module was given.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from scenarios import sync_batchnorm
from torch import nn

from common.grading.client import Submission
from common.grading.ranks import RankRun

TOLERANCE = {torch.float64: {"rtol": 1e-9, "atol": 1e-9}, torch.float32: {"rtol": 1e-4, "atol": 1e-4}}
# name: (rows per rank, channels, length (None: 2-D input), dtype)
CASES = {
    "2 ranks, 2-D": ([3, 5], 4, None, torch.float64),
    "3 ranks, 3-D": ([1, 7, 2], 3, 5, torch.float64),
    "4 ranks, equal": ([4, 4, 4, 4], 5, None, torch.float64),
    "a rank with no rows": ([6, 0, 3], 2, 4, torch.float64),
    "float32": ([8, 3, 5], 6, 3, torch.float32),
}


def make(sizes: list[int], channels: int, length: int | None, dtype: torch.dtype, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    shape = (sum(sizes), channels) + (() if length is None else (length,))
    x = (2 + 3 * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)
    return {
        "x": x,
        "grad": torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype),
        "weight": (0.5 + torch.rand(channels, generator=generator, dtype=torch.float64)).to(dtype),
        "bias": torch.randn(channels, generator=generator, dtype=torch.float64).to(dtype),
    }


def reference(data: dict, backward: bool = True) -> dict:
    bn = nn.BatchNorm1d(data["x"].shape[1]).double()
    with torch.no_grad():
        bn.weight.copy_(data["weight"])
        bn.bias.copy_(data["bias"])
    x = data["x"].double().requires_grad_(True)
    y = bn(x)
    seen = {"y": y.detach(), "running_mean": bn.running_mean, "running_var": bn.running_var}
    if backward:
        y.backward(data["grad"].double())
        seen.update(dx=x.grad, dweight=bn.weight.grad, dbias=bn.bias.grad)
    return seen


def run(submission: Submission, data: dict, sizes: list[int], backward: bool = True,
        groups: list[list[int]] | None = None) -> RankRun:  # fmt: skip
    xs = list(data["x"].split(sizes))
    grads = list(data["grad"].split(sizes)) if backward else None
    return RankRun.from_data(
        submission.run(sync_batchnorm.forward_backward, xs, grads, data["weight"], data["bias"], groups)
    )


def close(ours: torch.Tensor, expected: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    """`ours` (computed in `dtype`) equals the float64 reference up to `dtype`'s tolerance."""
    assert type(ours) is torch.Tensor and ours.shape == expected.shape, (
        f"{what}: expected a tensor of shape {list(expected.shape)}"
    )
    torch.testing.assert_close(ours.double(), expected, **TOLERANCE[dtype], msg=what)


def assert_like_batchnorm1d(
    per_rank: list[dict[str, Any]], ref: dict, dtype: torch.dtype, backward: bool
) -> None:
    for key in ("y", "dx") if backward else ("y",):
        for r, seen in enumerate(per_rank):
            assert seen[key].dtype == dtype, f"rank {r}'s {key} is {seen[key].dtype}, expected {dtype}"
        close(
            torch.cat([seen[key] for seen in per_rank]), ref[key], f"{key} of the concatenated ranks", dtype
        )
    for r, seen in enumerate(per_rank):
        close(seen["running_mean"], ref["running_mean"], f"running_mean on rank {r}", dtype)
        close(
            seen["running_var"],
            ref["running_var"],
            f"running_var on rank {r} (unbiased, global batch)",
            dtype,
        )
    if backward:
        for key in ("dweight", "dbias"):
            total = sum(seen[key].double() for seen in per_rank)
            close(total, ref[key], f"{key} summed over the ranks (each rank's share of the batch)", dtype)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_backward_equal_batchnorm1d(submission: Submission, case: str) -> None:
    sizes, channels, length, dtype = CASES[case]
    data = make(sizes, channels, length, dtype)
    ran = run(submission, data, sizes)
    assert_like_batchnorm1d(ran.returned(dict[str, torch.Tensor]), reference(data), dtype, backward=True)


@pytest.mark.parametrize("case", ["2 ranks, 2-D", "3 ranks, 3-D", "a rank with no rows"])
def test_one_collective_in_forward(submission: Submission, case: str) -> None:
    sizes, channels, length, dtype = CASES[case]
    data = make(sizes, channels, length, dtype, seed=1)
    ran = run(submission, data, sizes, backward=False)
    assert_like_batchnorm1d(
        ran.returned(dict[str, torch.Tensor]), reference(data, False), dtype, backward=False
    )
    for rank, log in enumerate(ran.collectives):
        assert len(log) == 1, (
            f"rank {rank} made {len(log)} collectives in forward ({[c.kind for c in log]}), expected 1"
        )


@pytest.mark.parametrize("case", ["2 ranks, 2-D", "4 ranks, equal"])
def test_one_collective_in_backward(submission: Submission, case: str) -> None:
    sizes, channels, length, dtype = CASES[case]
    data = make(sizes, channels, length, dtype, seed=2)
    ran = run(submission, data, sizes)
    ran.returned(dict[str, torch.Tensor])
    for rank, log in enumerate(ran.collectives):
        assert len(log) == 2, (
            f"rank {rank} made {len(log)} collectives in forward and backward ({[c.kind for c in log]}), "
            "expected one in each"
        )


def test_the_given_group_only(submission: Submission) -> None:
    """Four ranks, two SyncBatchNorm groups {0, 1} and {2, 3}: each normalises over its own group only."""
    sizes, groups = [3, 2, 4, 1], [[0, 1], [2, 3]]
    data = make(sizes, 3, None, torch.float64, seed=3)
    ran = run(submission, data, sizes, groups=groups)
    seen = ran.returned(dict[str, torch.Tensor])
    for members in groups:
        rows = [sum(sizes[:r]) + i for r in members for i in range(sizes[r])]
        part = {key: value[rows] if key in ("x", "grad") else value for key, value in data.items()}
        assert_like_batchnorm1d([seen[r] for r in members], reference(part), torch.float64, backward=True)
        for r in members:
            groups_used = {c.group for c in ran.collectives[r]}
            assert groups_used == {tuple(members)}, (
                f"rank {r} communicated on {groups_used}, not on its group"
            )


def test_running_statistics_then_eval_mode(submission: Submission) -> None:
    """Two training forwards update the running statistics; eval mode then uses them, with no collective."""
    sizes, channels = [2, 5, 3], 4
    steps = [make(sizes, channels, None, torch.float64, seed=seed) for seed in (4, 5)]
    test = make([6], channels, None, torch.float64, seed=6)["x"]
    batches = [[step["x"].split(sizes)[r] for step in steps] for r in range(len(sizes))]
    ran = RankRun.from_data(
        submission.run(sync_batchnorm.train_then_eval, batches, test, steps[0]["weight"], steps[0]["bias"])
    )
    seen = ran.returned(dict[str, torch.Tensor])
    bn = nn.BatchNorm1d(channels).double()
    with torch.no_grad():
        bn.weight.copy_(steps[0]["weight"])
        bn.bias.copy_(steps[0]["bias"])
        for step in steps:
            bn(step["x"])
        bn.eval()
        expected = bn(test)
    for rank, ours in enumerate(seen):
        close(
            ours["running_mean"],
            bn.running_mean,
            f"running_mean on rank {rank} after two steps",
            torch.float64,
        )
        close(
            ours["running_var"], bn.running_var, f"running_var on rank {rank} after two steps", torch.float64
        )
        close(ours["y"], expected, f"the eval-mode output on rank {rank}", torch.float64)
        assert len(ran.collectives[rank]) == 2, (
            f"rank {rank} made {len(ran.collectives[rank])} collectives in two training forwards and one eval "
            "forward, expected 2 (eval mode does not communicate)"
        )
