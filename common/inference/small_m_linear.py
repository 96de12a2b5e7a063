"""Linear layers whose few-row calls run on common.kernels.matmul's small-M path, one row on cuBLAS.

    target = use_small_m_linears(target)   # every bias-free nn.Linear, in place; the weights are shared

A speculative round's target forward multiplies k + 1 rows (the tokens it verifies) by every weight
matrix. At batch 1 that should cost about what a single row does: the weights are read once either way.
The H100 record of the speculative benchmark (fp32 target, cuBLAS) had a round of k = 2 take longer than
one of k = 4, which points at cuBLAS's fp32 kernels for a few rows (week-9 README). This module sends
calls of 2 to `max_rows` rows through `matmul_forward`, whose small-M path tiles 16 rows (and may split K
where the output has too few tiles to fill the GPU), wrapped as a torch.library custom op so that
torch.compile treats it as one opaque call and a CUDA graph can capture it. One row stays on F.linear
(cuBLAS's GEMV), and so do more than `max_rows` rows (a prompt). Whether the route is faster is what
`SpeculativeBenchmark(small_m_linears=True)` measures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.kernels.matmul import SMALL_M_MAX, matmul_forward

__all__ = ["MAX_ROWS", "SmallMLinear", "small_m_linear", "use_small_m_linears"]

MAX_ROWS = 16  # one 16-row tile: a round of draft length up to 15


@torch.library.custom_op("effdl::small_m_linear", mutates_args=())
def small_m_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for x (..., K) and nn.Linear's weight (N, K), read through a transposed view (no copy)."""
    y, _ = matmul_forward(x.reshape(-1, x.shape[-1]), weight.t())
    return y.view(*x.shape[:-1], weight.shape[0])


@small_m_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class SmallMLinear(nn.Module):
    """A bias-free nn.Linear's weight, multiplied by our Triton kernel for 2 ... max_rows rows of input."""

    def __init__(self, linear: nn.Linear, max_rows: int = MAX_ROWS) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("SmallMLinear takes bias-free nn.Linear layers (the model's are)")
        if not 2 <= max_rows <= SMALL_M_MAX:
            raise ValueError(
                f"max_rows must be in [2, {SMALL_M_MAX}] (the small-M path's rows), got {max_rows}"
            )
        self.weight = linear.weight
        self.max_rows = max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows == 1 or rows > self.max_rows:
            return F.linear(x, self.weight)
        return small_m_linear(x, self.weight)


def use_small_m_linears(model: nn.Module, max_rows: int = MAX_ROWS) -> nn.Module:
    """Replace every nn.Linear of model by a SmallMLinear on the same weight, in place; returns model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, SmallMLinear(child, max_rows))
    return model
