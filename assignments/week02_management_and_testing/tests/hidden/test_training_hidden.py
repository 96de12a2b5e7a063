"""Task training: a run is decided by its config (seed included) and nothing else, and its history is right.

Each run trains in the submission's worker (`scenarios/ddpm.py: train_run`); the checker compares runs with each
other and recomputes the epoch losses from the step losses and the batch sizes it knows.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from scenarios import ddpm as scenario

from common.grading.client import Submission


def config(seed: int, batch_size: int = 16) -> dict[str, Any]:
    return dict(num_steps=10, beta_start=1e-4, beta_end=0.2, hidden=16, epochs=2, batch_size=batch_size, lr=3e-3,
                seed=seed)  # fmt: skip


@pytest.mark.parametrize("seed", [0, 5])
def test_a_run_is_decided_by_its_seed(submission: Submission, seed: int) -> None:
    points = torch.randn(48, 2, generator=torch.Generator().manual_seed(100 + seed))
    first = submission.run(scenario.train_run, config(seed), points, 11, returns=scenario.TrainRun)
    again = submission.run(scenario.train_run, config(seed), points, 22, returns=scenario.TrainRun)
    other = submission.run(scenario.train_run, config(seed + 1), points, 11, returns=scenario.TrainRun)
    (first_steps, _, first_params), (again_steps, _, again_params) = first, again
    assert first_steps == again_steps and len(first_steps) == 6, (
        "two runs of one config differ (or do not take 3 steps per epoch): seed torch with config.seed in train"
    )
    assert len(first_params) == len(again_params) and all(
        torch.equal(a, b) for a, b in zip(first_params, again_params, strict=True)
    ), "two runs of one config end with different parameters"
    assert first_steps != other[0], (
        "runs with different seeds are identical: the run must use config.seed, not a fixed seed"
    )


@pytest.mark.parametrize("n, batch_size", [(100, 32), (70, 16)])
def test_the_epoch_loss_weights_batches_by_size(submission: Submission, n: int, batch_size: int) -> None:
    points = torch.randn(n, 2, generator=torch.Generator().manual_seed(n))
    steps, epochs, _ = submission.run(
        scenario.train_run, config(1, batch_size), points, 0, returns=scenario.TrainRun
    )
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    assert len(steps) == 2 * len(sizes) and len(epochs) == 2, (
        f"{len(steps)} steps and {len(epochs)} epoch losses for 2 epochs of {len(sizes)} batches"
    )
    for epoch in range(2):
        losses = steps[epoch * len(sizes) : (epoch + 1) * len(sizes)]
        expected = sum(loss * size for loss, size in zip(losses, sizes, strict=True)) / n
        assert math.isclose(epochs[epoch], expected, rel_tol=1e-5), (
            f"epoch {epoch}: epoch_loss is {epochs[epoch]:.6g}, the size-weighted mean of its steps is {expected:.6g}"
        )
