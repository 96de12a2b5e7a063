"""Vector addition: the first Triton kernel, and what a purely memory-bound kernel can reach.

What you will learn: how a Triton kernel is launched over a grid of programs, how each program handles one
block of BLOCK_SIZE elements with `tl.arange` and a mask for the ragged end, and how to judge a kernel
that does no real arithmetic: by its bandwidth, against a device-to-device copy.

Memory traffic of z = x + y with n elements of b bytes: read x and y, write z, 3nb bytes, and n FLOPs:
1/(3b) FLOP per byte, far left of any GPU's ridge point. The best it can do is move those bytes at the
speed of a copy (`common.bench.measured_copy_bandwidth`).

    z = vector_add(x, y)        # x, y: same shape, dtype and device; contiguous
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from common.kernels import check_input

__all__ = ["vector_add", "vector_add_reference"]

BLOCK_SIZE = 1024  # elements per program: 4 KiB of fp32 per input, 8 per thread with 4 warps


def vector_add_reference(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PyTorch's own elementwise add: one kernel, reads x and y once, writes the result once."""
    return x + y


@triton.jit
def _vector_add_kernel(x_ptr, y_ptr, z_ptr, n, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(axis=0)  # which block of the vector this program handles
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n  # the last block may run past the end
    x = tl.load(x_ptr + offsets, mask=mask)
    y = tl.load(y_ptr + offsets, mask=mask)
    tl.store(z_ptr + offsets, x + y, mask=mask)


def vector_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + y by a Triton kernel, one program per BLOCK_SIZE elements."""
    check_input(x, "x")
    check_input(y, "y")
    if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
        raise ValueError(
            f"x and y must have the same shape, dtype and device; got {tuple(x.shape)} {x.dtype} {x.device} "
            f"and {tuple(y.shape)} {y.dtype} {y.device} (this kernel does not broadcast)"
        )
    if not (x.is_contiguous() and y.is_contiguous()):
        raise ValueError(
            "x and y must be contiguous: the kernel reads them as flat arrays; pass .contiguous()"
        )
    z = torch.empty_like(x)
    n = x.numel()
    if n:
        grid = (triton.cdiv(n, BLOCK_SIZE),)
        _vector_add_kernel[grid](x, y, z, n, BLOCK_SIZE=BLOCK_SIZE)
    return z
