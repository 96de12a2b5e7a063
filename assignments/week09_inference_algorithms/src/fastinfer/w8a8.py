"""A W8A8 GEMM in Triton: int8 activations times int8 weights on the int8 tensor cores, dequantized at the end.

    x_q, x_scale = quantize_rows(x)      # activations (M, K): one scale per token
    w_q, w_scale = quantize_rows(w)      # weights (N, K), as nn.Linear stores them: one scale per output channel
    y = w8a8_matmul(x_q, x_scale, w_q, w_scale, out_dtype=torch.bfloat16)   # ≈ x @ w.T, (M, N)

What you will learn: why int8 GEMMs are exact where it matters (products of int8 codes summed in int32 make no
rounding error at all: |sum| <= 127^2 K < 2^31 for K < 133,000), where the scales go (they factor out of the
sum over K, so they are applied once per output element, in the epilogue: y[m, n] = acc[m, n] * x_scale[m] *
w_scale[n]), and why this is fast: Hopper's int8 tensor cores do twice the operations per second of bf16, and
int8 operands are half the bytes to load. The per-row scales are what make it accurate: a per-tensor scale
would let one large token coarsen every other token's grid.

Read `common/kernels/matmul.py` first: the tiling, the grouped tile order (reused here) and the autotuning are
the same; what changes is the operand type, the accumulator (int32) and the epilogue.
"""

from __future__ import annotations

import torch

# First: without a GPU, importing common.kernels switches on Triton's interpreter, which triton reads as it
# decorates each kernel.
from common.kernels import INTERPRETED, check_input, sm_count
from common.kernels.matmul import _tile_coords as tile_coords

# isort: split
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _config(bm: int, bn: int, bk: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}, num_warps=warps, num_stages=stages
    )


# Small tiles under the interpreter, so that the CPU tests' small shapes still cover several tiles, ragged
# edges and several steps along K. On a GPU, Hopper-sized tiles: an int8 K-step of 128 is 128 bytes per row,
# the width a 16-bit kernel gets from BLOCK_K = 64; 128 x 256 x 128 in 3 stages keeps 144 KB of operands in
# flight in shared memory (192 KB in 4 stages, under the H100's and H200's 227 KB), and its int32
# accumulator takes 128 registers per thread over 8 warps.
INTERPRETER_CONFIG = _config(32, 32, 32, 4, 1, group_m=2)
GPU_CONFIGS = [
    _config(128, 256, 128, 8, 3),
    _config(128, 256, 128, 8, 4),
    _config(256, 128, 128, 8, 3),
    _config(256, 128, 128, 8, 4),
    _config(128, 128, 128, 8, 4),
    _config(128, 128, 128, 4, 4),
    _config(128, 128, 64, 4, 4),
    _config(64, 128, 128, 4, 4),
    _config(128, 64, 128, 4, 4),
    _config(64, 64, 128, 4, 4),
]


@triton.autotune(configs=[INTERPRETER_CONFIG] if INTERPRETED else GPU_CONFIGS, key=["M", "N", "K"])
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _w8a8_kernel(x_ptr, w_ptr, x_scale_ptr, w_scale_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 EVEN_K: tl.constexpr):  # fmt: skip
    """One BLOCK_M x BLOCK_N tile of y = (x @ w.T) * x_scale[:, None] * w_scale[None, :], x (M, K) and
    w (N, K) int8 with unit stride along K; EVEN_K: K is a multiple of BLOCK_K, no mask along K."""
    # BEGIN SOLUTION: _w8a8_kernel: tile loop over K with tl.dot into an int32 accumulator, then _scale_and_store
    pid_m, pid_n = tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    m_mask, n_mask = rows < M, cols < N
    # w is read as w.T: a (BLOCK_K, BLOCK_N) slab whose columns are rows of w, K-major as int8 MMA wants it.
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :]
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_mask[:, None], other=0)
            w = tl.load(w_ptrs, mask=n_mask[None, :], other=0)
        else:
            k_mask = ks < K - k * BLOCK_K  # the last slab is ragged; padding loads 0 and adds nothing
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc = tl.dot(x, w, acc, out_dtype=tl.int32)  # exact: int8 products summed in int32
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    _scale_and_store(acc, rows, cols, M, N, x_scale_ptr, w_scale_ptr, y_ptr, stride_ym)
    # END SOLUTION


@triton.jit
def _scale_and_store(acc, rows, cols, M, N, x_scale_ptr, w_scale_ptr, y_ptr, stride_ym):
    """Both kernels' epilogue: y[rows, cols] = acc * x_scale[rows, None] * w_scale[None, cols] in fp32, rounded
    once to y's dtype; rows >= M and cols >= N (a ragged edge tile) are neither read nor written."""
    # BEGIN SOLUTION: _scale_and_store: the int32 sums to fp32, times the row scales and the column scales, stored with masks at the edges
    m_mask, n_mask = rows < M, cols < N
    x_scale = tl.load(x_scale_ptr + rows, mask=m_mask, other=0.0)
    w_scale = tl.load(w_scale_ptr + cols, mask=n_mask, other=0.0)
    y = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# Optional, for speed on Hopper: the same product with TMA loads and a persistent grid
# ----------------------------------------------------------------------------------------------------
# `common/kernels/matmul.py` (section 4) explains both. On an H100 this path measured 1.42x to 1.51x cuBLAS's
# bf16 GEMM at 4096³, 8192 x 4096 x 4096 and 8192³, where the kernel above alone had measured 1.22x to 1.31x: the
# TMA unit moves whole int8 tiles into shared memory with no address arithmetic in the threads, and one
# program per SM runs the next tile's first loads during this tile's epilogue. It needs a Hopper GPU and
# rows of 16-byte multiples (K % 16 == 0 for int8); elsewhere, and in the interpreter, `w8a8_matmul` takes
# the kernel above. 128 x 256 x 128 int8 tiles in 4 stages: 192 KB of operands in shared memory (224 KB
# with the epilogue's scratch, compiled for sm_90), under the 227 KB.


def tma_applies(x_q: torch.Tensor, w_q: torch.Tensor) -> bool:
    """Whether the TMA kernel can take these operands: a Hopper or newer GPU (not the interpreter), and
    16-byte aligned rows and base addresses for both int8 matrices."""
    if INTERPRETED or x_q.device.type != "cuda" or torch.cuda.get_device_capability(x_q.device) < (9, 0):
        return False
    return all(t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (x_q, w_q))


def _set_block_shapes(nargs: dict) -> None:
    """Autotuner pre-hook: give the descriptors the tile shapes of the config about to run."""
    nargs["x_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


TMA_CONFIGS = [
    triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "GROUP_M": 8},
        num_warps=8,
        num_stages=stages,
        pre_hook=_set_block_shapes,
    )
    for bm, bn, stages in [(128, 256, 4), (128, 256, 3), (256, 128, 3), (128, 128, 4)]
]


@triton.autotune(configs=TMA_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _w8a8_tma_kernel(x_desc, w_desc, x_scale_ptr, w_scale_ptr, y_ptr, M, N, K, stride_ym, NUM_SMS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr):  # fmt: skip
    """_w8a8_kernel's product with x and w as TMA descriptors (tiles past an edge load as zeros), one
    program per SM looping over the output tiles in grouped order."""
    # BEGIN SOLUTION: _w8a8_tma_kernel (optional, for speed on Hopper): a persistent loop over tiles; per tile, descriptor loads of x and w tiles, tl.dot with w's tile transposed, then _scale_and_store
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
        pid_m, pid_n = tile_coords(tile, num_m, num_n, GROUP_M)
        off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
        # (named `total`, not `acc`: the mutants edit _w8a8_kernel's lines, which the CPU tasks run)
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k_step in range(tl.cdiv(K, BLOCK_K)):
            x_tile = x_desc.load([off_m, k_step * BLOCK_K])  # (BLOCK_M, BLOCK_K)
            w_tile = w_desc.load([off_n, k_step * BLOCK_K])  # (BLOCK_N, BLOCK_K): rows of w
            total = tl.dot(x_tile, w_tile.T, total, out_dtype=tl.int32)
        rows, cols = off_m + tl.arange(0, BLOCK_M), off_n + tl.arange(0, BLOCK_N)
        _scale_and_store(total, rows, cols, M, N, x_scale_ptr, w_scale_ptr, y_ptr, stride_ym)
    # END SOLUTION


def _check_operands(
    x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor
) -> None:
    """Raise a TypeError/ValueError naming the operand that w8a8_matmul cannot take."""
    for name, codes, scale in (("x_q", x_q, x_scale), ("w_q", w_q, w_scale)):
        check_input(codes, name, (torch.int8,))
        check_input(scale, f"{name[0]}_scale", (torch.float32,))
        if codes.dim() != 2 or codes.stride(-1) != 1:
            raise ValueError(
                f"{name} must be 2-D with a contiguous last dim, got shape {tuple(codes.shape)} and strides "
                f"{codes.stride()}: pass {name}.contiguous()"
            )
        if scale.shape != codes.shape[:1]:
            raise ValueError(
                f"{name[0]}_scale must hold one scale per row of {name} ({codes.shape[0]}), got shape "
                f"{tuple(scale.shape)}"
            )
    if x_q.shape[1] != w_q.shape[1]:
        raise ValueError(
            f"x_q is (M, K) = {tuple(x_q.shape)} and w_q is (N, K) = {tuple(w_q.shape)}: their K differ"
        )
    if len({x_q.device, w_q.device, x_scale.device, w_scale.device}) != 1:
        raise ValueError("x_q, x_scale, w_q and w_scale must be on one device")


def w8a8_matmul(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                out_dtype: torch.dtype = torch.float16) -> torch.Tensor:  # fmt: skip
    """y = (x_q @ w_q.T) * x_scale[:, None] * w_scale[None, :], (M, N) in out_dtype: what `quantize_rows` of
    x (M, K) and of w (N, K) stand for, multiplied as x @ w.T.

    x_q (M, K) and w_q (N, K) int8, each with a contiguous last dim; x_scale (M,) and w_scale (N,) float32.
    The products are summed in int32, exactly; the sum is converted to float32 and multiplied by x_scale[m],
    then by w_scale[n], in float32, then rounded once to out_dtype (float16, bfloat16 or float32). One Triton
    kernel does it all, on a CUDA GPU, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1; bfloat16
    is wrong there, so use float16 or float32). Operands of another dtype, shape or device are a TypeError or
    ValueError that names them.
    """
    _check_operands(x_q, x_scale, w_q, w_scale)
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    (M, K), N = x_q.shape, w_q.shape[0]
    y = torch.empty((M, N), dtype=out_dtype, device=x_q.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_()

    # BEGIN SOLUTION: w8a8_matmul: launch the kernel on a grid of output tiles (its size depends on the autotuned BLOCK_M and BLOCK_N); optionally, the TMA kernel where tma_applies
    def tiles(meta: dict) -> int:
        return triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])

    if tma_applies(x_q, w_q):
        sms = sm_count(x_q.device)
        # Block shapes are placeholders: the autotuner's pre-hook sets each config's before it runs.
        x_desc, w_desc = (
            TensorDescriptor.from_tensor(x_q, [1, 16]),
            TensorDescriptor.from_tensor(w_q, [1, 16]),
        )
        _w8a8_tma_kernel[lambda meta: (min(sms, tiles(meta)),)](
            x_desc, w_desc, x_scale, w_scale, y, M, N, K, y.stride(0), NUM_SMS=sms
        )
    else:
        _w8a8_kernel[lambda meta: (tiles(meta),)](
            x_q, w_q, x_scale, w_scale, y, M, N, K, x_q.stride(0), w_q.stride(0), y.stride(0)
        )
    # END SOLUTION
    return y
