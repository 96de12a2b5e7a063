"""Task sampling: one reverse step draws its noise as specified, and sampling follows the model's dtype."""

from __future__ import annotations

import pytest
import reference
import torch
from scenarios import ddpm as scenario

from common.grading.client import Submission


@pytest.mark.parametrize("t", [1, 37])
def test_p_sample_matches_the_reverse_step(submission: Submission, t: int) -> None:
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(t))
    theirs = submission.run(scenario.p_sample, x, t, 7, 50, returns=torch.Tensor)
    expected = reference.p_sample(scenario.Affine(), x, t, 7, 50)
    assert theirs.shape == expected.shape, f"p_sample returned shape {tuple(theirs.shape)}, expected (256, 2)"
    worst = (theirs - expected).abs().max().item()
    assert torch.allclose(theirs, expected, rtol=1e-4, atol=1e-5), (
        f"p_sample at t={t} differs from the reverse step by up to {worst:.3g}: z must be "
        "torch.randn(x.shape, generator=generator), one number per coordinate, from the generator given"
    )


@pytest.mark.parametrize("n", [1, 9])
def test_sampling_follows_the_models_dtype(submission: Submission, n: int) -> None:
    points = submission.run(scenario.sample_float64, n, 3, returns=torch.Tensor)
    assert points.dtype == torch.float64 and points.shape == (n, 2), (
        f"sample(..., dtype=torch.float64) returned {points.dtype} of shape {tuple(points.shape)}"
    )
    assert torch.isfinite(points).all(), "sample returned non-finite points"
