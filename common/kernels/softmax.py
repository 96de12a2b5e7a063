"""Softmax: a fused, persistent Triton kernel, row by row, forward and backward.

What you will learn: why softmax is memory-bound and how fusing it reduces the memory traffic to the
minimum (read x once, write y once); how a *persistent* kernel launches one wave of programs that loop
over the rows; how short rows are packed several to a program; and how rows too long for registers are
handled with the *online* softmax, the trick at the heart of FlashAttention.

    y[i, j] = exp(x[i, j] - max_k x[i, k]) / sum_k exp(x[i, k] - max_k x[i, k])      (along the last dim)

Subtracting the row maximum changes nothing mathematically and keeps exp() from overflowing.

Run the tests (CPU: Triton's interpreter, small shapes; GPU: real shapes and bf16):

    pytest tests/kernels/test_softmax.py            # add -m gpu on a GPU machine
    effdl bench kernels --kernel softmax            # GB/s against torch.softmax, on a GPU
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from common.kernels import as_rows, row_tile
from common.kernels.benchmark import Goal, KernelCase, require_gpu
from common.kernels.launch import LaunchCache

__all__ = [
    "benchmark_cases",
    "softmax",
    "softmax_backward",
    "softmax_forward",
    "softmax_reference",
]

# ----------------------------------------------------------------------------------------------------
# 1. The reference, and what it costs
# ----------------------------------------------------------------------------------------------------


def softmax_reference(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, written the naive way: each line is one kernel and one trip to memory.

    For M rows of N elements of e bytes, the lines read about 5 MN and write 3 MN elements: 8 MN e bytes.
    The data need only be read once and written once (2 MN e bytes): a fused kernel keeps a row in
    registers between the steps and moves 4x less. torch.softmax is fused too: it is the benchmark's
    baseline, and the tests check the kernels against it in float64.
    """
    row_max = x.max(dim=-1, keepdim=True).values  # read MN,          write M
    shifted = x - row_max  # read MN + M,     write MN
    numerator = torch.exp(shifted)  # read MN,          write MN
    denominator = numerator.sum(dim=-1, keepdim=True)  # read MN,          write M
    return numerator / denominator  # read MN + M,     write MN


# ----------------------------------------------------------------------------------------------------
# 2. The fused forward kernel: a block of rows lives in registers from load to store
# ----------------------------------------------------------------------------------------------------
#
# Each program owns BLOCK_M rows of BLOCK_N (>= N, a power of two) columns. Short rows (N = 256) would
# leave most threads idle with one row per program, so several are packed into one tile. The grid is
# *persistent*: as many programs as fit on the GPU at once, each looping over row blocks
# pid, pid + num_programs, ... instead of one program per block. That saves launching and scheduling
# thousands of short programs, and lets `tl.range(..., num_stages=2)` prefetch the next block's rows while
# the current one is reduced.
#
# Masked columns load as -inf: exp(-inf - max) = 0, so padding adds nothing to the sum. Row offsets are
# computed in int64: M x N can exceed 2^31 elements on a large GPU.


@triton.jit
def _softmax_fwd_kernel(
    x_ptr,
    y_ptr,
    n_rows,
    n_cols,
    x_row_stride,
    y_row_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    n_blocks = tl.cdiv(n_rows, BLOCK_M)
    for block in tl.range(tl.program_id(0), n_blocks, tl.num_programs(0), num_stages=NUM_STAGES):
        rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        # Rows past the end re-read the last row (no NaN from an all -inf row); their stores are masked.
        src = tl.minimum(rows, n_rows - 1)
        x = tl.load(
            x_ptr + src[:, None] * x_row_stride + cols[None, :], mask=col_mask[None, :], other=-float("inf")
        ).to(tl.float32)
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        numerator = tl.exp(x - tl.max(x, axis=1)[:, None])
        y = numerator / tl.sum(numerator, axis=1)[:, None]
        tl.store(
            y_ptr + rows[:, None] * y_row_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask
        )


# ----------------------------------------------------------------------------------------------------
# 3. Rows too long for registers: the online softmax
# ----------------------------------------------------------------------------------------------------
#
# Past MAX_FUSED_N columns a row no longer fits in one program's registers. Reading it in chunks, the
# maximum is not known until the end, yet the sum of exponentials needs it. The online softmax keeps a
# running maximum m and a running sum s = sum exp(x - m); when a chunk raises the maximum to m', the sum so
# far is rescaled by exp(m - m'). One pass gives (m, s), a second writes exp(x - m) / s: 2 reads and 1
# write of the row instead of 1 and 1, still far better than the 8 of the naive version. Each of the
# BLOCK_N lanes keeps its own (m, s) and they are combined at the end, so the loop has no reduction in it.
# The second read need not reach DRAM: the rows in flight (one per program, 128 KB each for N = 65536 in
# bf16) fit in L2, and cache hints ask L2 to keep them (evict_last) and to drop what is used only once
# (evict_first), so that only the first read and the write cost DRAM bandwidth.


@triton.jit
def _softmax_fwd_online_kernel(
    x_ptr,
    y_ptr,
    n_rows,
    n_cols,
    x_row_stride,
    y_row_stride,
    BLOCK_N: tl.constexpr,
):
    offsets = tl.arange(0, BLOCK_N)
    for row in tl.range(tl.program_id(0), n_rows, tl.num_programs(0)):
        x_row = x_ptr + tl.cast(row, tl.int64) * x_row_stride
        y_row = y_ptr + tl.cast(row, tl.int64) * y_row_stride
        m = tl.full([BLOCK_N], -float("inf"), tl.float32)
        s = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + offsets
            # evict_last: keep the row in L2 for the second pass (132 rows of 128 KB in flight fit in 50 MB).
            x = tl.load(
                x_row + cols, mask=cols < n_cols, other=-float("inf"), eviction_policy="evict_last"
            ).to(tl.float32)
            m_new = tl.maximum(m, x)
            # A lane that has seen only -inf keeps s = 0; shifting by 0 there avoids exp(-inf + inf) = NaN.
            shift = tl.where(m_new == -float("inf"), 0.0, m_new)
            s = s * tl.exp(m - shift) + tl.exp(x - shift)
            m = m_new
        row_max = tl.max(m, axis=0)
        total = tl.sum(s * tl.exp(m - row_max), axis=0)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + offsets
            # Last use of x, and y is not read again here: evict_first keeps them from pushing out the
            # rows other programs are about to re-read.
            x = tl.load(
                x_row + cols, mask=cols < n_cols, other=-float("inf"), eviction_policy="evict_first"
            ).to(tl.float32)
            y = tl.exp(x - row_max) / total
            tl.store(
                y_row + cols, y.to(y_ptr.dtype.element_ty), mask=cols < n_cols, eviction_policy="evict_first"
            )


# ----------------------------------------------------------------------------------------------------
# 4. Backward: dx = y * (dy - sum_j dy_j y_j), again one row in registers
# ----------------------------------------------------------------------------------------------------
#
# Saving y (not x) for backward makes it one fused pass: read y and dy, write dx (3 MN e bytes). Long
# rows take two passes over y and dy, the first for the dot product.


@triton.jit
def _softmax_bwd_kernel(
    y_ptr,
    dy_ptr,
    dx_ptr,
    n_rows,
    n_cols,
    y_row_stride,
    dy_row_stride,
    dx_row_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    n_blocks = tl.cdiv(n_rows, BLOCK_M)
    for block in tl.range(tl.program_id(0), n_blocks, tl.num_programs(0), num_stages=NUM_STAGES):
        rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (rows < n_rows)[:, None] & col_mask[None, :]
        y = tl.load(y_ptr + rows[:, None] * y_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
        dx = y * (dy - tl.sum(y * dy, axis=1)[:, None])
        tl.store(
            dx_ptr + rows[:, None] * dx_row_stride + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask
        )


@triton.jit
def _softmax_bwd_long_kernel(
    y_ptr,
    dy_ptr,
    dx_ptr,
    n_rows,
    n_cols,
    y_row_stride,
    dy_row_stride,
    dx_row_stride,
    BLOCK_N: tl.constexpr,
):
    offsets = tl.arange(0, BLOCK_N)
    for row in tl.range(tl.program_id(0), n_rows, tl.num_programs(0)):
        y_row = y_ptr + tl.cast(row, tl.int64) * y_row_stride
        dy_row = dy_ptr + tl.cast(row, tl.int64) * dy_row_stride
        dx_row = dx_ptr + tl.cast(row, tl.int64) * dx_row_stride
        acc = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + offsets
            y = tl.load(y_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            acc += y * dy
        dot = tl.sum(acc, axis=0)
        for start in range(0, n_cols, BLOCK_N):
            cols = start + offsets
            y = tl.load(y_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            dy = tl.load(dy_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            tl.store(dx_row + cols, (y * (dy - dot)).to(dx_ptr.dtype.element_ty), mask=cols < n_cols)


# ----------------------------------------------------------------------------------------------------
# 5. Launch: tile shape, warps and the persistent grid
# ----------------------------------------------------------------------------------------------------

# The tile shape, warps and grid come from common.kernels (row_tile, persistent_grid), shared with the
# norms. The reasoning:
# - BLOCK_N is N rounded up to a power of two (tl.arange needs one); rows shorter than TILE_ELEMENTS are
#   packed BLOCK_M to a tile, so short rows still give every thread work.
# - num_warps grows with the tile (4 to 32 warps) so that a thread holds at most ~32 fp32 values per
#   array it keeps: more would spill registers to (slow) local memory.
# - The grid is persistent and sized by occupancy: the compiled kernel's registers per thread and shared
#   memory say how many programs fit on one SM at once, and exactly that many per SM are launched. Each
#   program then takes every num_programs-th row block. More programs would form a second wave and leave
#   SMs idle at the end; fewer would leave too few loads in flight to keep HBM busy.
# - num_stages=2 lets the compiler prefetch the next tile through shared memory while this one is being
#   reduced, for tiles small enough to double-buffer.

# Longest row kept whole in registers: 32768 fp32 values over 32 warps is 32 registers per thread. The
# backward holds two such rows (y and dy), so its limit is half that; past it, rows are read in chunks.
MAX_FUSED_N = 32768
MAX_FUSED_N_BACKWARD = 16384
# Chunk and warps of the online (long-row) kernels: 4096 values over 16 warps, 8 per thread.
LONG_BLOCK_N = 4096
LONG_NUM_WARPS = 16


# Launched through LaunchCache (launch.py): on the H200's host Triton's own launch path made the host,
# not the GPU, the bottleneck of a 128 MiB softmax: timed back to back it reached 27-54% of copy bandwidth
# (common/kernels/README.md, "Results on H200").
_LAUNCHES = {
    kernel: LaunchCache(kernel)
    for kernel in (
        _softmax_fwd_kernel,
        _softmax_fwd_online_kernel,
        _softmax_bwd_kernel,
        _softmax_bwd_long_kernel,
    )
}


def forward_launch(n_cols: int, element_size: int) -> tuple[int, int, int, int | None]:
    """(tile elements, num_warps, num_stages, waves) of the fused forward for rows of n_cols elements.

    Chosen from a sweep on an H200 (128 MiB inputs; each setting timed twice, spread under 1%), where
    memory-bound kernels need more bytes in flight than on an H100: its HBM3e moves 4.2 TB/s against
    the H100's 3 TB/s at about the same latency (Little's law). What the sweep found:
    - fp32 rows carry twice the bytes per element, and one program per 4096-element tile, scheduled by
      the hardware (waves=None), was the best setting at every row length.
    - 16-bit rows: short rows want big tiles (16384 elements: 64 rows of 256), mid-length rows a deeper
      persistent grid (2 waves), long rows (16384) 2 waves and a 3-stage pipeline that keeps two more
      rows loading while one is reduced.
    In `effdl bench kernels` on the H200 these settings run at 84-97% of copy bandwidth, where the old
    rule (4096-element tiles, 1 wave) ran at 75-89% (common/kernels/README.md, "Results on H200").
    - At least 8 warps: with 4, the fp16 build of a 16384 x 4096 case needed 50 registers against bf16's
      52, so 10 programs fit per SM instead of 9, and that grid ran at 78% of copy bandwidth on an H100.
    """
    block_n = triton.next_power_of_2(n_cols)
    if element_size >= 4:
        tile, warps, stages, waves = 4096, 16 if block_n >= 4096 else 8, 1, None
    elif block_n <= 256:
        tile, warps, stages, waves = 16384, 8, 2, None
    elif block_n <= 2048:
        tile, warps, stages, waves = 4096, 8, 1, 2
    elif block_n <= 8192:
        tile, warps, stages, waves = 8192, 8, 1, None
    else:
        tile, warps, stages, waves = 16384, 8, 3, 2
    # Rows longer than the sweep's 16384 keep at most 64 fp32 values per thread.
    return tile, max(warps, block_n // 2048), stages, waves


def softmax_forward(x: torch.Tensor) -> torch.Tensor:
    """Softmax of x over its last dim with the Triton kernels (no autograd). fp32/fp16/bf16 in and out."""
    x2 = as_rows(x, "x")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_rows, n_cols = x2.shape
    if y.numel() == 0:
        return y
    y2 = y.view(n_rows, n_cols)
    args = (x2, y2, n_rows, n_cols, x2.stride(0), y2.stride(0))
    waves: int | None = 1
    if n_cols <= MAX_FUSED_N:
        tile, num_warps, num_stages, waves = forward_launch(n_cols, x.element_size())
        block_m, block_n, _, _ = row_tile(n_cols, x.element_size(), tile_elements=tile)
        meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "NUM_STAGES": num_stages, "num_warps": num_warps}
        kernel, n_blocks = _softmax_fwd_kernel, triton.cdiv(n_rows, block_m)
    else:
        meta = {"BLOCK_N": LONG_BLOCK_N, "num_warps": LONG_NUM_WARPS}
        kernel, n_blocks = _softmax_fwd_online_kernel, n_rows
    _LAUNCHES[kernel].launch_persistent(n_blocks, *args, waves=waves, **meta)
    return y


def softmax_backward(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Gradient of softmax at output y for upstream gradient dy: dx = y * (dy - sum(dy * y, last dim))."""
    if dy.shape != y.shape or dy.dtype != y.dtype or dy.device != y.device:
        raise ValueError(
            f"dy must match y in shape, dtype and device: y {tuple(y.shape)} {y.dtype} {y.device}, "
            f"dy {tuple(dy.shape)} {dy.dtype} {dy.device}"
        )
    y2, dy2 = as_rows(y, "y"), as_rows(dy, "dy")
    dx = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    n_rows, n_cols = y2.shape
    if dx.numel() == 0:
        return dx
    dx2 = dx.view(n_rows, n_cols)
    args = (y2, dy2, dx2, n_rows, n_cols, y2.stride(0), dy2.stride(0), dx2.stride(0))
    if n_cols <= MAX_FUSED_N_BACKWARD:
        # Two rows (y and dy) live in registers, and two inputs per element position stream in.
        block_m, block_n, num_warps, num_stages = row_tile(n_cols, 2 * y.element_size(), live_rows=2)
        meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "NUM_STAGES": num_stages, "num_warps": num_warps}
        kernel, n_blocks = _softmax_bwd_kernel, triton.cdiv(n_rows, block_m)
    else:
        meta = {"BLOCK_N": LONG_BLOCK_N, "num_warps": LONG_NUM_WARPS}
        kernel, n_blocks = _softmax_bwd_long_kernel, n_rows
    _LAUNCHES[kernel].launch_persistent(n_blocks, *args, **meta)
    return dx


class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = softmax_forward(x)
        ctx.save_for_backward(y)  # y, not x: the backward needs only y, and saves recomputing exp
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        # Autograd may hand over an expanded or transposed gradient (e.g. from .sum()): the kernel needs
        # rows, so this copies in that case only.
        return softmax_backward(y, dy.contiguous())


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim with the fused Triton kernels; differentiable. Like torch.softmax(x, -1)."""
    return _Softmax.apply(x)


# ----------------------------------------------------------------------------------------------------
# 6. Benchmark: GB/s against torch.softmax, on inputs far larger than L2
# ----------------------------------------------------------------------------------------------------
#
# The sweep keeps the input at 2^26 elements (128 MiB in bf16, 256 MiB in fp32: well past the 50 MiB L2
# of an H100, so DRAM is what is measured) and varies the row length N. The minimal traffic is the bytes
# of x and y (forward) or of y, dy and dx (backward); the goal is 85% of the measured device-copy
# bandwidth, i.e. within 15% of what a plain copy of the same bytes achieves. Read the result as: how
# close to "free" softmax is once fused. Expect small N to be the hardest (short rows, more reductions
# per byte) and the online kernel (N > MAX_FUSED_N) to sit between 2/3 of the fused bandwidth (if its
# second read of x came from DRAM) and the fused bandwidth (if L2 served all of it); its GB/s counts the
# minimal traffic.

BANDWIDTH_GOAL = Goal("frac_measured_bw", ">=", 0.85, ">= 85% of copy BW")


def benchmark_cases(quick: bool = False) -> list[KernelCase]:
    """Forward (bf16, fp16, fp32) and backward (bf16) cases over the row length N; GPU only."""
    device = require_gpu("softmax benchmark")
    n_elements = 2**22 if quick else 2**26
    sweep = [1024, 4096] if quick else [256, 1024, 4096, 16384, 65536]
    cases: list[KernelCase] = []
    for dtype in (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        for n in sweep:
            x = torch.randn(n_elements // n, n, device=device, dtype=dtype)
            nbytes = 2 * x.numel() * x.element_size()
            goals = (BANDWIDTH_GOAL,) if nbytes / 2 >= 128 * 2**20 and n <= MAX_FUSED_N else ()
            cases.append(
                KernelCase(
                    kernel="softmax",
                    label=f"fwd {x.shape[0]}x{n} {name}",
                    x=n,
                    ours=lambda x=x: softmax_forward(x),
                    baseline=lambda x=x: torch.softmax(x, dim=-1),
                    baseline_name="torch.softmax",
                    bytes=nbytes,
                    dtype=dtype,
                    goals=goals,
                )
            )
    for n in sweep:
        y = torch.softmax(torch.randn(n_elements // n, n, device=device, dtype=torch.bfloat16), dim=-1)
        dy = torch.randn_like(y)
        cases.append(
            KernelCase(
                kernel="softmax",
                label=f"bwd {y.shape[0]}x{n} bfloat16",
                x=n,
                ours=lambda y=y, dy=dy: softmax_backward(y, dy),
                baseline=lambda y=y, dy=dy: torch._softmax_backward_data(dy, y, -1, y.dtype),
                baseline_name="torch softmax backward",
                bytes=3 * y.numel() * y.element_size(),
                dtype=torch.bfloat16,
            )
        )
    return cases
