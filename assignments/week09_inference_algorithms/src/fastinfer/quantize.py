"""Row-wise int8 quantization with absmax scales, as a Triton kernel.

    q, scale = quantize_rows(x)          # x (..., K) fp32/fp16/bf16 -> q (..., K) int8, scale (...) fp32
    x ≈ q.float() * scale[..., None]     # the dequantized rows

What you will learn: why each row gets its own scale (one outlier token must not crush the resolution of every
other token, so activations are quantized per token, weights per output channel), how a row-wise reduction
and an elementwise map fuse into one pass over memory (read x once, write q and the scales), and how to round
in a kernel exactly as `torch.round` does.

The scale maps the row's largest magnitude to 127: scale = absmax / 127. The int8 code -128 is never used, so
the grid is symmetric and negating x negates q. A W8A8 GEMM (`fastinfer.w8a8`) consumes q and scale.

Read `common/kernels/softmax.py` first: the same shape of kernel (a tile of whole rows per program, one
reduction along the row), and `common.kernels.as_rows` and `row_tile`, which this module reuses.
"""

from __future__ import annotations

import torch

# First: without a GPU, importing common.kernels switches on Triton's interpreter, which triton reads as it
# decorates each kernel.
from common.kernels import as_rows, row_tile

# isort: split
import triton
import triton.language as tl

# The largest int8 code used: the grid is -127 ... 127. A constexpr, so that the kernels may read it.
QMAX = tl.constexpr(127)


@triton.jit
def _round_half_to_even(y):
    """torch.round in fp32: to the nearest integer, ties to the even one. (Triton's libdevice.rint does this
    on a GPU but not in the interpreter; floor(y + 0.5) rounds 0.49999997 up, since y + 0.5 is rounded.)"""
    # BEGIN SOLUTION: _round_half_to_even: floor, then add 1 where the fraction is above 1/2, or exactly 1/2 and the floor is odd
    whole = tl.floor(y)
    frac = y - whole
    odd = (whole - 2.0 * tl.floor(whole * 0.5)) == 1.0
    return whole + tl.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)  # y - floor(y) is exact
    # END SOLUTION


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, M, K, stride_xm, BLOCK_M: tl.constexpr,
                          BLOCK_K: tl.constexpr):  # fmt: skip
    """Program i quantizes rows i * BLOCK_M ... of x (row stride stride_xm) into q (M, K) and scale (M,)."""
    # BEGIN SOLUTION: _quantize_rows_kernel: load a tile of whole rows in fp32, absmax per row, scale, round, clamp, store
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    rows64 = rows[:, None].to(tl.int64)  # M x K can pass 2^31 elements
    x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.max(tl.abs(x), axis=1) / QMAX  # (BLOCK_M,): padding loads 0 and never wins the max
    y = x / tl.where(scale > 0, scale, 1.0)[:, None]  # a row of zeros: scale 0, codes 0
    q = tl.minimum(tl.maximum(_round_half_to_even(y), -QMAX), QMAX)  # |y| <= 127 already, up to rounding
    tl.store(q_ptr + rows64 * K + cols[None, :], q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + rows, scale, mask=rows < M)
    # END SOLUTION


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of x (..., K) to int8 with its own scale: (q, scale), q (..., K) int8 contiguous,
    scale (...) float32.

    In float32 (x converted first): scale = max_k |x[..., k]| / 127, and q = round(x / scale), rounded to the
    nearest integer with ties to even (as `torch.round`), which lies in [-127, 127]. A row of zeros has
    scale 0 and q 0. x must be float32, float16 or bfloat16 with a contiguous last dim, on a CUDA GPU, or on
    the CPU under Triton's interpreter (TRITON_INTERPRET=1; bfloat16 is refused there); anything else is a
    TypeError or ValueError that says what to change. The work is one Triton kernel, one pass over x.
    """
    rows = as_rows(x, "x")
    M, K = rows.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scale = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0 or K == 0:
        return q.view(x.shape), scale.zero_().view(x.shape[:-1])
    # BEGIN SOLUTION: quantize_rows: launch a Triton kernel over tiles of whole rows: absmax / 127 per row, round half to even, int8
    block_m, block_k, num_warps, _ = row_tile(K, x.element_size())
    grid = (triton.cdiv(M, block_m),)
    _quantize_rows_kernel[grid](
        rows, q, scale, M, K, rows.stride(0), BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps
    )
    # END SOLUTION
    return q.view(x.shape), scale.view(x.shape[:-1])
