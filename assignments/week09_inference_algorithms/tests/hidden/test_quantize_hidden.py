"""Hidden tests of `fastinfer.quantize.quantize_rows` (task quantize_rows, CPU: Triton's interpreter).

The submission quantizes in its worker; the expected codes and scales are computed here (`int8_reference`).
The scales must equal absmax / 127 to the last bit but one (2 ulp: a GPU's division); the codes must be
equal, except one off where x / scale lies within 1e-4 of a tie (where a GPU's division may round the
quotient across it). Ties themselves are tested on rows built so that x / scale is exact. Tensors reach the
worker contiguous, so a strided view is made there (`scenarios/int8_kernels.py`).
"""

from __future__ import annotations

import int8_reference as reference
import pytest
import torch
from scenarios import int8_kernels

from common.grading.client import Submission

PAIR = tuple[torch.Tensor, torch.Tensor]


def quantize(submission: Submission, x: torch.Tensor) -> PAIR:
    q, scale = submission.run(int8_kernels.quantize, x, returns=PAIR)
    assert q.dtype == torch.int8 and q.shape == x.shape, (
        f"q must be int8 of x's shape {list(x.shape)}, got {q.dtype} of shape {list(q.shape)}"
    )
    assert scale.dtype == torch.float32 and scale.shape == x.shape[:-1], (
        f"scale must be float32 of shape {list(x.shape[:-1])}, got {scale.dtype} of shape {list(scale.shape)}"
    )
    return q, scale


def check(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, exact: bool = False) -> None:
    """q and scale against the reference; exact: no code may be one off, not even near a tie (for rows whose
    x / scale is exact on any hardware)."""
    expected_q, expected_scale = reference.quantize_rows(x)
    torch.testing.assert_close(
        scale, expected_scale, rtol=2**-22, atol=0, msg=lambda m: f"the scales are not absmax / 127: {m}"
    )
    off = (q.int() - expected_q.int()).abs()
    allowed = (off == 0) | ((off == 1) & reference.near_tie(x, expected_scale) & (not exact))
    assert bool(allowed.all()), (
        f"{int((off != 0).sum())} of {q.numel()} codes differ from round(x / scale) (ties to even), e.g. at "
        f"{[int(i) for i in (~allowed).nonzero()[0]]}"
    )


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


@pytest.mark.parametrize(
    ("shape", "dtype", "scale"),
    [
        ((1, 1), torch.float32, 1.0),
        ((3, 1000), torch.float32, 1.0),
        ((37, 129), torch.float16, 1.0),
        ((64, 64), torch.float32, 1e4),
        ((20, 77), torch.float32, 1e-6),
        ((2, 5, 33), torch.float16, 3.0),
    ],
    ids=["1x1", "3x1000", "37x129-fp16", "large-values", "tiny-values", "3d-fp16"],
)
def test_codes_and_scales_equal_the_reference(
    submission: Submission, shape: tuple[int, ...], dtype: torch.dtype, scale: float
) -> None:
    x = randn(*shape, seed=sum(shape), dtype=dtype, scale=scale)
    check(x, *quantize(submission, x))


def test_outlier_rows_keep_their_own_scale(submission: Submission) -> None:
    x = randn(16, 96, seed=5)
    x[3] *= 1000.0  # an outlier token: its scale must not touch the other rows'
    x[7, 11] = -500.0  # an outlier in one channel of one row
    check(x, *quantize(submission, x))


def test_ties_round_to_even(submission: Submission) -> None:
    # absmax 127 (scale 1) and 254 (scale 2): x / scale is exact, even with a GPU's division, and every
    # code is a tie: each must round to the even neighbour.
    halves = torch.arange(-126.5, 127.0, 1.0)  # every tie in the range
    x = torch.stack(
        [torch.cat([halves, torch.tensor([127.0])]), torch.cat([2 * halves, torch.tensor([-254.0])])]
    )
    check(x, *quantize(submission, x), exact=True)


def test_a_row_of_zeros_has_scale_zero(submission: Submission) -> None:
    x = randn(5, 40, seed=6)
    x[2] = 0.0
    q, scale = quantize(submission, x)
    assert scale[2].item() == 0.0 and bool((q[2] == 0).all()), "a row of zeros must have scale 0 and codes 0"
    check(x, q, scale)


def test_rows_with_a_stride(submission: Submission) -> None:
    x = randn(9, 150, seed=7)
    # Made in the worker: rows of 100 values, 150 apart (a view, not a copy).
    q, scale = submission.run(int8_kernels.quantize_columns, x, 10, 110, returns=PAIR)
    check(x[:, 10:110], q, scale)
