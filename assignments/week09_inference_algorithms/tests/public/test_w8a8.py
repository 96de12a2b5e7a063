"""Public tests of `fastinfer.w8a8.w8a8_matmul` (the hidden ones try more shapes and sizes).

Runs in Triton's CPU interpreter on a machine without a GPU, on the GPU otherwise.
"""

from __future__ import annotations

import torch
from fastinfer.w8a8 import w8a8_matmul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def int8(*shape: int, seed: int) -> torch.Tensor:
    return torch.randint(-127, 128, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


def test_equals_the_exact_product() -> None:
    # K = 300: sums up to ~10^5, past fp16's largest value (65504) and not a multiple of any tile.
    x_q, w_q = int8(37, 300, seed=0), int8(45, 300, seed=1)
    x_scale = torch.rand(37, generator=torch.Generator().manual_seed(2)) / 100
    w_scale = torch.rand(45, generator=torch.Generator().manual_seed(3)) / 100
    y = w8a8_matmul(*(t.to(DEVICE) for t in (x_q, x_scale, w_q, w_scale)), out_dtype=torch.float16)
    assert y.dtype == torch.float16 and y.shape == (37, 45)
    exact = (x_q.long() @ w_q.long().T).double() * x_scale.double()[:, None] * w_scale.double()[None, :]
    # int32 sums are exact; three fp32 roundings (~2^-24 each) and one fp16 rounding (2^-11): within one
    # fp16 ulp (2^-10) of the exact value.
    torch.testing.assert_close(y.cpu().double(), exact, rtol=2**-10, atol=0)


def test_quantized_product_is_close_to_fp16() -> None:
    from fastinfer.quantize import quantize_rows  # your row quantization, if it is written

    generator = torch.Generator().manual_seed(4)
    x = torch.randn(64, 256, generator=generator).half().to(DEVICE)
    w = (torch.randn(96, 256, generator=generator) * 0.05).half().to(DEVICE)
    y = w8a8_matmul(*quantize_rows(x), *quantize_rows(w), out_dtype=torch.float16)
    exact = x.double() @ w.double().T
    error = (y.double() - exact).norm(dim=1) / exact.norm(dim=1)  # relative error of each output row
    assert error.mean() < 0.03 and error.quantile(0.95) < 0.07, (error.mean(), error.quantile(0.95))
