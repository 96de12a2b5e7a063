"""Public tests of `fastinfer.quantize.quantize_rows` (the hidden ones try more shapes, strides and edge cases).

Runs in Triton's CPU interpreter on a machine without a GPU, on the GPU otherwise.
"""

from __future__ import annotations

import pytest
import torch
from fastinfer.quantize import quantize_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The docstring's definition in PyTorch: absmax / 127 per row, round half to even, in float32."""
    x = x.float()
    scale = x.abs().amax(-1) / 127
    q = torch.round(x / torch.where(scale > 0, scale, 1.0)[..., None])
    return q.to(torch.int8), scale


def near_half(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Where x / scale lies within 1e-4 of a half-integer. A GPU divides in fp32 to within 2 ulp (~1.5e-5 at
    127), so there a code may round the other way than torch's correctly rounded division: one off, no more."""
    y = x.float() / torch.where(scale > 0, scale, 1.0)[..., None]
    return ((y - y.floor()) - 0.5).abs() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_the_reference(dtype: torch.dtype) -> None:
    x = torch.randn(7, 300, generator=torch.Generator().manual_seed(0)).to(dtype).to(DEVICE)
    q, scale = quantize_rows(x)
    expected_q, expected_scale = reference(x)
    assert q.dtype == torch.int8 and q.shape == x.shape and scale.shape == (7,)
    torch.testing.assert_close(scale, expected_scale, rtol=2**-22, atol=0)  # a GPU's division: 2 ulp
    off = (q.int() - expected_q.int()).abs()
    assert off.max() <= 1 and bool((off == 0)[~near_half(x, expected_scale)].all())


def test_ties_round_to_even_and_a_zero_row_has_scale_zero() -> None:
    # absmax 127: scale 1, so x / scale == x exactly, and x holds ties.
    ties = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.25], [0.0] * 8], device=DEVICE)
    q, scale = quantize_rows(ties)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 3], [0] * 8]
    assert scale.tolist() == [1.0, 0.0]
