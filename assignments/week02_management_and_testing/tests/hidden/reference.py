"""The checker's own DDPM arithmetic, written from the paper (Ho et al. 2020), for the expected values.

Nothing here comes from the student's package (the checker never imports it) or from the reference src/.
"""

from __future__ import annotations

import math

import torch


def alpha_bars(steps: int, b0: float, b1: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(betas, alpha_bar) of a linear schedule, float32 like the assignment's."""
    betas = torch.linspace(b0, b1, steps, dtype=torch.float32)
    return betas, torch.cumprod(1.0 - betas, dim=0)


def q_sample(
    x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, steps: int, b0: float, b1: float
) -> torch.Tensor:
    _, bars = alpha_bars(steps, b0, b1)
    bar = bars[t][:, None].double()
    return (bar.sqrt() * x0.double() + (1.0 - bar).sqrt() * noise.double()).float()


def p_sample(model, x: torch.Tensor, t: int, seed: int, steps: int) -> torch.Tensor:
    """One reverse step with z drawn as the assignment specifies: float32, on the CPU, from a seeded generator."""
    betas, bars = alpha_bars(steps, 1e-4, 0.2)
    beta, bar = float(betas[t]), float(bars[t])
    with torch.no_grad():
        eps = model(x, torch.full((x.shape[0],), t, dtype=torch.int64))
        mean = (x - beta / math.sqrt(1.0 - bar) * eps) / math.sqrt(1.0 - beta)
    if t == 0:
        return mean
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x)
    return mean + math.sqrt(beta) * z
