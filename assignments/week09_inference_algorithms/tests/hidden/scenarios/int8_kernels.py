"""Runs in the submission's worker: the student's kernels on the task's device (the GPU of a GPU task), on
strided views, which data sent to the worker cannot be (tensors arrive contiguous), and with a dtype argument,
which is not data either.

Before the submission is imported, the course's PyTorch quantizers (`common.inference.quantization`, whose
`quantize_int8` is the same absmax rule) are refused: the task is the Triton kernel. As in week 5, that
states the rule (common.grading.off_limits); on a CPU nothing the checker sees tells a kernel from PyTorch.

Each function returns the kernel's raw outputs, on the CPU; the checker computes the expected values.
"""

from __future__ import annotations

import torch

from common.grading.off_limits import refuse_imports

OFF_LIMITS = ("common.inference.quantization",)
REASON = "write the quantization and the GEMM as Triton kernels"


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows(x) on the task's device."""
    refuse_imports(OFF_LIMITS, REASON)
    from fastinfer.quantize import quantize_rows

    q, scale = quantize_rows(x.to(_device()))
    return q.cpu(), scale.cpu()


def quantize_columns(x: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows(x[:, start:stop]): rows that are `x.shape[1]` elements apart, on the task's device."""
    refuse_imports(OFF_LIMITS, REASON)
    from fastinfer.quantize import quantize_rows

    q, scale = quantize_rows(x.to(_device())[:, start:stop])
    return q.cpu(), scale.cpu()


def w8a8(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, out_dtype: str,
         k: int | None = None) -> torch.Tensor:  # fmt: skip
    """w8a8_matmul(..., out_dtype=torch.<out_dtype>) on the task's device (a dtype is not data: it is sent by
    name); with k, on the first k columns of x_q and w_q, whose rows are then longer than k apart."""
    refuse_imports(OFF_LIMITS, REASON)
    from fastinfer.w8a8 import w8a8_matmul

    device = _device()
    x_q, x_scale, w_q, w_scale = (t.to(device) for t in (x_q, x_scale, w_q, w_scale))
    if k is not None:
        x_q, w_q = x_q[:, :k], w_q[:, :k]
    return w8a8_matmul(x_q, x_scale, w_q, w_scale, out_dtype=getattr(torch, out_dtype)).cpu()
