"""A test of "these samples come from that distribution", with a stated significance level and power.

The statistic is the total variation distance between the empirical distribution of n samples and the
claimed distribution p over a finite set: TV = 1/2 sum_i |count_i / n - p_i|.

- Its mean under p: E |count_i / n - p_i| <= sqrt(p_i (1 - p_i) / n) (Jensen), so E TV <= m(p, n) with
  m(p, n) = 1/2 sum_i sqrt(p_i (1 - p_i) / n).
- Its spread: one sample moves TV by at most 1 / n, so McDiarmid's inequality gives
  P(TV >= E TV + t) <= exp(-2 n t^2).

So rejecting when TV > m(p, n) + sqrt(ln(1 / alpha) / (2 n)) wrongly rejects a correct sampler with
probability at most alpha. Against a wrong sampler whose distribution w is at distance delta = TV(w, p), the
triangle inequality and the same two bounds for w give power >= 1 - beta once

    delta >= m(p, n) + m(w, n) + sqrt(ln(1 / alpha) / (2 n)) + sqrt(ln(1 / beta) / (2 n)),

every term of which shrinks as 1 / sqrt(n): `samples_needed` solves for n. No distributional approximation
(unlike the chi-squared test's), and it needs nothing beyond math.
"""

from __future__ import annotations

import math

import torch

ALPHA = 1e-3  # chance of rejecting a correct sampler
BETA = 1e-3  # chance of missing the stated wrong sampler


def mean_bound(probs: torch.Tensor, n: int) -> float:
    """m(p, n): a bound on the expected TV between n samples' empirical distribution and p."""
    p = probs.double()
    return 0.5 * (p * (1 - p) / n).sqrt().sum().item()


def threshold(probs: torch.Tensor, n: int, alpha: float = ALPHA) -> float:
    """Reject "samples ~ probs" when their empirical TV from probs is above this."""
    return mean_bound(probs, n) + math.sqrt(math.log(1 / alpha) / (2 * n))


def total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * (a.double() - b.double()).abs().sum().item()


def samples_needed(probs: torch.Tensor, wrong: torch.Tensor, alpha: float = ALPHA, beta: float = BETA) -> int:
    """The n at which the test tells `wrong` from `probs` with probability >= 1 - beta (see the docstring)."""
    delta = total_variation(probs, wrong)
    if delta == 0:
        raise ValueError("the wrong distribution equals the right one: no sample size tells them apart")
    # every term of the power condition is (a constant) / sqrt(n): evaluate the constants at n = 1
    constant = threshold(probs, 1, alpha) + mean_bound(wrong, 1) + math.sqrt(math.log(1 / beta) / 2)
    return math.ceil((constant / delta) ** 2)


def empirical(samples: torch.Tensor, size: int) -> torch.Tensor:
    """Frequencies of the values 0 ... size - 1 in samples (any shape)."""
    return torch.bincount(samples.flatten(), minlength=size).double() / samples.numel()


def looks_like(samples: torch.Tensor, probs: torch.Tensor, alpha: float = ALPHA) -> tuple[bool, str]:
    """Whether the test accepts "samples ~ probs", with the numbers for an assertion message."""
    distance = total_variation(empirical(samples, probs.numel()), probs)
    limit = threshold(probs, samples.numel(), alpha)
    return distance <= limit, f"TV {distance:.4f} vs threshold {limit:.4f} at n={samples.numel()}"
