"""The checker's own int8 arithmetic, written from the docstrings, for the expected values.

Nothing here comes from the student's package (the checker never imports it) or from the reference src/.
"""

from __future__ import annotations

import torch

QMAX = 127

# A GPU divides in fp32 to within 2 ulp (~1.5e-5 at 127, Triton's default `/`), so there a code whose exact
# quotient lies within that of a half-integer may round the other way than torch's correctly rounded
# division. 1e-4 leaves room; random fp32 data puts a quotient that close to a tie ~1 time in 5000.
NEAR_TIE = 1e-4


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8, scale float32): absmax / 127 per row, round half to even, in float32."""
    x = x.float()
    scale = x.abs().amax(-1) / QMAX
    q = torch.round(x / torch.where(scale > 0, scale, 1.0)[..., None])
    return q.to(torch.int8), scale


def near_tie(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Where x / scale lies within NEAR_TIE of a half-integer: the one place a code may be one off."""
    y = x.float() / torch.where(scale > 0, scale, 1.0)[..., None]
    return ((y - y.floor()) - 0.5).abs() < NEAR_TIE


def w8a8_exact(
    x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor
) -> torch.Tensor:
    """(x_q @ w_q.T) * x_scale[:, None] * w_scale[None, :] in float64, on the tensors' device. The sums are
    exact: |sum| <= 127^2 K < 2^53 (a float64 matmul, since CUDA has no int64 one)."""
    acc = x_q.double() @ w_q.double().T
    return acc * x_scale.double()[:, None] * w_scale.double()[None, :]


def row_relative_error(y: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """||y_m - exact_m|| / ||exact_m|| for each output row m (a per-element ratio blows up where exact ~ 0)."""
    return (y.double() - exact).norm(dim=-1) / exact.norm(dim=-1)
