"""Hidden tests of `fastinfer.w8a8.w8a8_matmul` (task w8a8_gemm, CPU: Triton's interpreter).

Two properties, each checked against values computed here (`int8_reference`):

- exact arithmetic: on random int8 codes and scales, y equals the exact product (int64 sums, float64 scales)
  to within one ulp of the output dtype (the int32 sum is exact; converting it and the two scale products
  in fp32 cost ~3 * 2^-24, the final rounding half an ulp). Sums reach ~10^5-10^8, past fp16's range and
  fp32's 2^24: an accumulator in fp16 overflows, one in fp32 rounds.
- accuracy against fp16: on fp16 activations and weights quantized here (per token, per output channel),
  the relative error of each output row against the exact product of the fp16 inputs has a mean below 0.03
  and a 95th percentile below 0.07.

Shapes are awkward (not multiples of any tile; K not a multiple of the K step) and small, for the interpreter.
"""

from __future__ import annotations

import int8_reference as reference
import pytest
import torch
from scenarios import int8_kernels

from common.grading.client import Submission

ULP = {torch.float16: 2.0**-10, torch.float32: 2.0**-23}


def operands(m: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=generator)
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
    x_scale = torch.rand(m, generator=generator) * 0.02 + 1e-4
    w_scale = torch.rand(n, generator=generator) * 0.002 + 1e-5
    return x_q, x_scale, w_q, w_scale


def check_exact(
    y: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, rtol: float | None = None
) -> None:
    assert type(y) is torch.Tensor and y.dtype == dtype and y.shape == expected.shape, (
        f"expected a {dtype} tensor of shape {list(expected.shape)}, got "
        f"{getattr(y, 'dtype', type(y))} of shape {list(getattr(y, 'shape', []))}"
    )
    torch.testing.assert_close(
        y.double(),
        expected,
        rtol=rtol or ULP[dtype],
        atol=0,
        msg=lambda m: f"y differs from the exact product: {m}",
    )


@pytest.mark.parametrize(
    ("m", "n", "k", "dtype"),
    [
        (1, 1, 1, torch.float16),
        (37, 45, 300, torch.float16),
        (64, 96, 256, torch.float32),
        (5, 70, 33, torch.float32),
        (70, 9, 97, torch.float16),
    ],
    ids=["1x1x1", "37x45x300", "64x96x256-fp32", "5x70x33-fp32", "70x9x97"],
)
def test_equals_the_exact_product(submission: Submission, m: int, n: int, k: int, dtype: torch.dtype) -> None:
    args = operands(m, n, k, seed=m + n + k)
    y = submission.run(int8_kernels.w8a8, *args, str(dtype).removeprefix("torch."), returns=torch.Tensor)
    check_exact(y, reference.w8a8_exact(*args), dtype)


def test_large_sums_stay_exact(submission: Submission) -> None:
    # Rows 0-3 of x and of w: 6000 codes in [100, 127], so 16 products sum to ~7.7e7, past 2^26, where fp32's
    # step is 8: an fp32 accumulator rounds at nearly every addition of a K step's partial sum, and is off by
    # several half-steps; the exact int32 sum converted once is off by at most half a step. Scales are powers
    # of two, so the epilogue's products are exact: y must be the exact product correctly rounded (2^-24).
    generator = torch.Generator().manual_seed(1)
    x_q, w_q = (torch.randint(-127, 128, (8, 6000), dtype=torch.int8, generator=generator) for _ in range(2))
    x_q[:4] = torch.randint(100, 128, (4, 6000), dtype=torch.int8, generator=generator)
    w_q[:4] = torch.randint(100, 128, (4, 6000), dtype=torch.int8, generator=generator)
    x_scale, w_scale = torch.full((8,), 2.0**-12), torch.full((8,), 2.0**-14)
    y = submission.run(int8_kernels.w8a8, x_q, x_scale, w_q, w_scale, "float32", returns=torch.Tensor)
    check_exact(y, reference.w8a8_exact(x_q, x_scale, w_q, w_scale), torch.float32, rtol=2.0**-24)


def test_rows_with_a_stride(submission: Submission) -> None:
    x_q, x_scale, w_q, w_scale = operands(20, 30, 150, seed=3)
    # Made in the worker: the first 100 columns, rows 150 apart (views, not copies).
    y = submission.run(int8_kernels.w8a8, x_q, x_scale, w_q, w_scale, "float16", 100, returns=torch.Tensor)
    check_exact(y, reference.w8a8_exact(x_q[:, :100], x_scale, w_q[:, :100], w_scale), torch.float16)


@pytest.mark.parametrize(("m", "n", "k"), [(64, 96, 512), (33, 50, 200)])
def test_quantized_product_is_close_to_fp16(submission: Submission, m: int, n: int, k: int) -> None:
    generator = torch.Generator().manual_seed(m * n)
    x = torch.randn(m, k, generator=generator).half()  # activations
    w = (torch.randn(n, k, generator=generator) * 0.05).half()  # weights, nn.Linear's (out, in)
    x_q, x_scale = reference.quantize_rows(x)
    w_q, w_scale = reference.quantize_rows(w)
    y = submission.run(int8_kernels.w8a8, x_q, x_scale, w_q, w_scale, "float16", returns=torch.Tensor)
    assert y.shape == (m, n), f"expected shape {[m, n]}, got {list(y.shape)}"
    error = reference.row_relative_error(y, x.double() @ w.double().T)
    mean, p95 = error.mean().item(), error.quantile(0.95).item()
    # Rounding each operand to 255 levels of its row's absmax costs ~1% per row on Gaussian data.
    assert mean < 0.03 and p95 < 0.07, (
        f"relative error of the output rows against fp16: mean {mean:.4f} (must be < 0.03), 95th percentile "
        f"{p95:.4f} (must be < 0.07)"
    )
