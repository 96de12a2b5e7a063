"""Task forward_process: q(x_t | x0) in closed form, and the training noise is standard normal."""

from __future__ import annotations

import pytest
import reference
import torch
from scenarios import ddpm as scenario

from common.grading.client import Submission


@pytest.mark.parametrize("steps, b0, b1", [(50, 1e-4, 0.2), (200, 1e-3, 0.05)])
def test_q_sample_matches_the_closed_form(submission: Submission, steps: int, b0: float, b1: float) -> None:
    g = torch.Generator().manual_seed(steps)
    x0, noise = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    t = torch.randint(0, steps, (64,), generator=g)
    t[:2] = torch.tensor([0, steps - 1])
    theirs = submission.run(scenario.q_sample, x0, t, noise, steps, b0, b1, returns=torch.Tensor)
    expected = reference.q_sample(x0, t, noise, steps, b0, b1)
    assert theirs.shape == expected.shape and theirs.dtype == torch.float32, (
        f"q_sample returned {theirs.dtype} of shape {tuple(theirs.shape)}; expected float32 {tuple(expected.shape)}"
    )
    worst = (theirs - expected).abs().max().item()
    assert torch.allclose(theirs, expected, rtol=1e-4, atol=1e-5), (
        f"q_sample differs from sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise by up to {worst:.3g}"
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_the_training_noise_is_standard_normal(submission: Submission, seed: int) -> None:
    # With x0 = 0 and a denoiser predicting c, the loss is E[(c - noise)^2]: 1 for c = 0 and 2 for c = 1 when
    # noise ~ N(0, 1). Over 80,000 numbers each estimate is within 0.02 of that with overwhelming probability.
    zero, one = submission.run(scenario.noise_losses, 40_000, seed, returns=list[float])
    assert abs(zero - 1.0) < 0.04 and abs(one - 2.0) < 0.06, (
        f"diffusion_loss's noise has E[noise^2] = {zero:.3f} and E[(1 - noise)^2] = {one:.3f}; "
        "standard normal noise gives 1 and 2"
    )
