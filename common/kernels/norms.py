"""RMSNorm and LayerNorm: fused Triton kernels, forward and backward, and a two-stage weight-gradient reduction.

What you will learn: that a normalization layer is a memory-bound row reduction like softmax, so one fused
pass (read x, write y) is the whole game in the forward; that RMSNorm is LayerNorm without the mean
(and without a bias), so one kernel with compile-time switches serves both; and how to reduce the
weight and bias gradients over all rows *without atomics*: each program sums its own rows into a private
partial row, and a second small kernel adds the partials up.

    LayerNorm: y = (x - mean(x)) / sqrt(var(x) + eps) * w + b         (over the last dim, per row)
    RMSNorm:   y = x / sqrt(mean(x^2) + eps) * w

Run the tests and the benchmark:

    pytest tests/kernels/test_norms.py              # add -m gpu on a GPU machine
    effdl bench kernels --kernel rmsnorm --kernel layernorm
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from common.kernels import as_rows, check_input, persistent_grid, row_tile, sm_count
from common.kernels.benchmark import Goal, KernelCase, require_gpu
from common.kernels.launch import LaunchCache

__all__ = [
    "MAX_N",
    "benchmark_cases",
    "layer_norm",
    "layer_norm_reference",
    "norm_backward",
    "norm_forward",
    "rms_norm",
    "rms_norm_reference",
]

# ----------------------------------------------------------------------------------------------------
# 1. References, and what they cost
# ----------------------------------------------------------------------------------------------------
#
# For M rows of N elements of e bytes. Written out op by op, each line is a kernel and a trip to DRAM:


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm op by op: about 4 MN reads and 3 MN writes, where one read and one write would do."""
    mean_square = x.pow(2).mean(dim=-1, keepdim=True)  # read MN, write MN (x^2), read MN, write M
    normalized = x * torch.rsqrt(mean_square + eps)  # read MN + M, write MN
    return normalized * weight  # read MN + N, write MN


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm op by op: about 7 MN reads and 5 MN writes, where one read and one write would do."""
    mean = x.mean(dim=-1, keepdim=True)  # read MN, write M
    centered = x - mean  # read MN, write MN
    var = centered.pow(2).mean(dim=-1, keepdim=True)  # read MN, write MN, read MN, write M
    y = centered * torch.rsqrt(var + eps) * weight  # read 2 MN, write 2 MN
    return y + bias if bias is not None else y  # read MN, write MN


# A fused kernel moves 2 MN e bytes in the forward: 3.5x (RMSNorm) and 6x (LayerNorm) less than the lines
# above. The benchmark's baselines are what a PyTorch user would call, F.layer_norm (a fused kernel) and
# F.rms_norm; the tests check against both, in float64.

# ----------------------------------------------------------------------------------------------------
# 2. Forward: one kernel for both norms
# ----------------------------------------------------------------------------------------------------
#
# The same persistent, row-tiled structure as softmax.py (read it first): BLOCK_M whole rows per tile,
# programs looping over row blocks. w (and b) are loaded once per program, outside the loop. Per row the
# kernel also stores rstd = 1/sqrt(var + eps) (and the mean for LayerNorm) in fp32: 4-8 bytes per row,
# which spare the backward a reduction over the row. RMS and HAS_BIAS are tl.constexpr, so the compiler
# removes the branch not taken: the RMSNorm kernel has no mean in it at all.


@triton.jit
def _norm_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    mean_ptr,
    rstd_ptr,
    n_rows,
    n_cols,
    x_row_stride,
    y_row_stride,
    eps,
    RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    n_blocks = tl.cdiv(n_rows, BLOCK_M)
    for block in tl.range(tl.program_id(0), n_blocks, tl.num_programs(0), num_stages=NUM_STAGES):
        rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if RMS:
            xc = x
        else:
            mean = tl.sum(x, axis=1) / n_cols
            tl.store(mean_ptr + rows, mean, mask=row_mask)
            xc = tl.where(mask, x - mean[:, None], 0.0)  # padding must stay 0 for the variance
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)
        y = xc * rstd[:, None] * w[None, :]
        if HAS_BIAS:
            y += b[None, :]
        tl.store(
            y_ptr + rows[:, None] * y_row_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask
        )


# ----------------------------------------------------------------------------------------------------
# 3. Backward: dx per row, and dw, db summed over rows without atomics
# ----------------------------------------------------------------------------------------------------
#
# With xhat = (x - mean) * rstd (RMSNorm: x * rstd) and g = dy * w, the chain rule through the row's own
# statistics gives
#
#     dx = rstd * (g - xhat * mean(g * xhat) - mean(g))          (RMSNorm: no mean(g) term)
#     dw = sum over rows of dy * xhat,     db = sum over rows of dy
#
# dx is per row, like the forward. dw and db are sums over *all* M rows, which thousands of programs
# would each have to add into the same N addresses: with tl.atomic_add, they queue on those addresses
# (contention grows with the number of programs) and the float sum comes out in a different order on
# every run, so results are not reproducible bit for bit. Instead each persistent program accumulates its
# rows into a register row, writes it to its own row of a (programs x N) fp32 buffer, and
# _sum_partials_kernel adds the rows of that buffer. The buffer is small: programs x N x 4 bytes, at
# most a few percent of the traffic of x and dy at the sizes where speed matters.


@triton.jit
def _norm_bwd_kernel(
    x_ptr,
    w_ptr,
    dy_ptr,
    dx_ptr,
    mean_ptr,
    rstd_ptr,
    dw_partial_ptr,
    db_partial_ptr,
    n_rows,
    n_cols,
    x_row_stride,
    dy_row_stride,
    dx_row_stride,
    RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    # Tile-shaped accumulators: adding dy * xhat elementwise keeps each thread on its own elements, and the
    # sum over the BLOCK_M rows of the tile (threads of different warps) happens once, after the loop.
    # Summing over rows inside the loop would cost a shared-memory round trip and barriers per tile.
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    n_blocks = tl.cdiv(n_rows, BLOCK_M)
    for block in tl.range(pid, n_blocks, tl.num_programs(0), num_stages=NUM_STAGES):
        rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        # Padding (rows past the end, columns past N) loads as 0 with rstd = 0, so it adds 0 to every sum.
        x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        if RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        c1 = tl.sum(g * xhat, axis=1) / n_cols
        if RMS:
            dx = (g - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(g, axis=1) / n_cols
            dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(
            dx_ptr + rows[:, None] * dx_row_stride + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask
        )
        dw_acc += dy * xhat
        if HAS_BIAS:
            db_acc += dy
    tl.store(dw_partial_ptr + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    if HAS_BIAS:
        tl.store(db_partial_ptr + pid * n_cols + cols, tl.sum(db_acc, axis=0), mask=col_mask)


# Long LayerNorm rows, in two passes. With N = 16384 the four row-sized fp32 arrays above (x, dy and the
# dw, db accumulators) no longer fit one program's registers, and the LayerNorm backward spills (0.68x
# PyTorch on an H200; RMSNorm, with no db, still ran 1.6x and keeps the one-pass kernel). Only the two row
# statistics c1 = mean(g * xhat) and c2 = mean(g) need a whole row, so:
#   pass 1, one program per row, reads the row in chunks and stores c1 and c2 (4-8 bytes per row);
#   pass 2, a 2D grid of column blocks x row groups, computes dx for its columns from c1 and c2 and sums
#   dy * xhat and dy over its rows for its columns only: a column block of dw, db per program.
# x and dy are read twice (5 passes over M x N elements instead of 3), in exchange for nothing spilling:
# 1.31x PyTorch at 4096 x 16384 bf16 on an H200 (benchmarks/results/nvidia-h200/kernels_layernorm.json).


@triton.jit
def _norm_bwd_row_sums_kernel(
    x_ptr,
    w_ptr,
    dy_ptr,
    mean_ptr,
    rstd_ptr,
    c1_ptr,
    c2_ptr,
    n_cols,
    x_row_stride,
    dy_row_stride,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    mean, rstd = tl.load(mean_ptr + row), tl.load(rstd_ptr + row)
    acc1 = tl.zeros([BLOCK_N], tl.float32)  # g * xhat, summed per lane and reduced once at the end
    acc2 = tl.zeros([BLOCK_N], tl.float32)  # g
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        g = dy * w
        acc1 += g * xhat
        acc2 += g
    tl.store(c1_ptr + row, tl.sum(acc1, axis=0) / n_cols)
    tl.store(c2_ptr + row, tl.sum(acc2, axis=0) / n_cols)


@triton.jit
def _norm_bwd_columns_kernel(
    x_ptr,
    w_ptr,
    dy_ptr,
    dx_ptr,
    mean_ptr,
    rstd_ptr,
    c1_ptr,
    c2_ptr,
    dw_partial_ptr,
    db_partial_ptr,
    n_rows,
    n_cols,
    x_row_stride,
    dy_row_stride,
    dx_row_stride,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    group, n_groups = tl.program_id(1), tl.num_programs(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for block in tl.range(group, tl.cdiv(n_rows, BLOCK_M), n_groups):
        rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        c1 = tl.load(c1_ptr + rows, mask=row_mask, other=0.0)
        c2 = tl.load(c2_ptr + rows, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dx = (dy * w[None, :] - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(
            dx_ptr + rows[:, None] * dx_row_stride + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask
        )
        dw_acc += dy * xhat
        if HAS_BIAS:
            db_acc += dy
    tl.store(dw_partial_ptr + group * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    if HAS_BIAS:
        tl.store(db_partial_ptr + group * n_cols + cols, tl.sum(db_acc, axis=0), mask=col_mask)


@triton.jit
def _sum_partials_kernel(
    partial_ptr, out_ptr, n_partials, n_cols, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr
):
    """out[j] = sum_p partial[p, j]: each program owns BLOCK_N columns and walks down all the partials."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    acc = tl.zeros([BLOCK_P, BLOCK_N], tl.float32)
    for start in range(0, n_partials, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        mask = (p < n_partials)[:, None] & col_mask[None, :]
        acc += tl.load(partial_ptr + p[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=col_mask)


# ----------------------------------------------------------------------------------------------------
# 4. Launch, checks and autograd
# ----------------------------------------------------------------------------------------------------

# Longest row this lesson keeps whole in registers. The backward holds four row-sized arrays (x, dy and
# the dw, db accumulators): for 16384 columns that is 64 fp32 values per thread with 32 warps, the most a
# thread of a 1024-thread program can have; longer rows would spill to local memory.
MAX_N = 16384
# Rows this long (and longer) fill one program's tile alone, and only one or two such programs fit on an SM
# (registers): while a program reduces its row, nothing of the next row would be in flight. Prefetching two
# rows ahead through shared memory (3 stages: 64 KB for a bf16 row of 16384, 128 KB in fp32, within an H100's
# 227 KB) keeps the loads of the next rows going during the reduction of this one.
LONG_ROW = 8192
LONG_ROW_STAGES = 3
# Tile of the partials reduction: 32 partial rows x 128 columns per step.
PARTIAL_BLOCK_P, PARTIAL_BLOCK_N = 32, 128
# The two-pass LayerNorm backward (section 3) for rows this long: the one-pass kernel measured 0.68x
# PyTorch at N = 16384 on an H200, while RMSNorm, with one accumulator fewer, ran 1.6x and keeps it.
TWO_PASS_BACKWARD_FROM = 16384
TWO_PASS_ROW_BLOCK_N = 4096  # pass 1 reads a row 4096 columns at a time: 16 values per thread and array
TWO_PASS_TILE = (4, 1024)  # pass 2: rows x columns per step; 4 tile-sized fp32 arrays, 64 values a thread
TWO_PASS_WAVES = 4  # pass 2 launches about this many programs per SM


def _check_params(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    n = x.shape[-1] if x.dim() > 0 else 0
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_input(p, name)
        if p.shape != (n,):
            raise ValueError(f"{name} has shape {tuple(p.shape)}, but x's last dim is {n}: it must be ({n},)")
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}: move them to one device")
        if p.stride(0) != 1:
            raise ValueError(f"{name} is strided (stride {p.stride(0)}): pass {name}.contiguous()")
    if n > MAX_N:
        raise ValueError(
            f"rows of {n} elements are longer than this kernel's MAX_N = {MAX_N} (a row is kept whole in "
            "registers); use torch.nn.functional's norms for longer rows"
        )


# Launched through LaunchCache (launch.py): on the H200's host Triton's own launch path made the host,
# not the GPU, the bottleneck of a 128 MiB LayerNorm: timed back to back it reached 24-50% of copy bandwidth
# (common/kernels/README.md, "Results on H200").
_FORWARD = LaunchCache(_norm_fwd_kernel)
_BACKWARD = LaunchCache(_norm_bwd_kernel)
_ROW_SUMS = LaunchCache(_norm_bwd_row_sums_kernel)
_COLUMNS = LaunchCache(_norm_bwd_columns_kernel)
_SUM_PARTIALS = LaunchCache(_sum_partials_kernel)


def forward_launch(n_cols: int, rms: bool) -> tuple[int, int, int, int | None]:
    """(tile elements, num_warps, num_stages, waves) of the forward for rows of n_cols elements.

    From a sweep on an H200 (bf16, 128 MiB inputs, each setting timed twice, spread under 1%; the
    reasoning is softmax.forward_launch's). RMSNorm: 8192-element tiles of 4 warps, one program per tile,
    for rows up to 4096; LayerNorm, which also centres each row, did best with fewer bytes in flight per
    program. Rows of 8192 or more: one row per tile, persistent, 3 stages. In `effdl bench kernels` on
    the H200: RMSNorm 87-92%, LayerNorm 84-90% of copy bandwidth.
    """
    block_n = triton.next_power_of_2(n_cols)
    if rms and block_n <= 4096:
        return 8192, 4, 2, None
    if rms and block_n <= 8192:
        return 16384, 8, LONG_ROW_STAGES, None
    if not rms and block_n <= 1024:
        return 4096, 4, 1, 1
    if not rms and block_n <= 2048:
        return 8192, 4, 1, None
    if not rms and block_n <= 4096:
        return 8192, 4, LONG_ROW_STAGES, 1
    _, _, num_warps, num_stages = row_tile(n_cols, 2)
    return block_n, num_warps, LONG_ROW_STAGES if block_n >= LONG_ROW else num_stages, 1


def norm_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, rms: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(y, mean, rstd) of RMSNorm (rms=True; mean is None) or LayerNorm over x's last dim. No autograd.

    y has x's dtype; mean and rstd are fp32, one per row, for the backward.
    """
    x2 = as_rows(x, "x")
    _check_params(x, weight, bias)
    if rms and bias is not None:
        raise ValueError("RMSNorm has no bias: pass bias=None with rms=True")
    n_rows, n_cols = x2.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    mean = None if rms else torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if y.numel() == 0:
        return y, mean, rstd
    y2 = y.view(n_rows, n_cols)
    tile, num_warps, num_stages, waves = forward_launch(n_cols, rms)
    block_m, block_n, _, _ = row_tile(n_cols, x.element_size(), tile_elements=tile)
    # Pointers a variant does not read (b without a bias, mean for RMSNorm) get a stand-in tensor: the
    # constexpr branch that would read them is compiled away.
    args = (x2, weight, weight if bias is None else bias, y2, rstd if mean is None else mean, rstd,
            n_rows, n_cols, x2.stride(0), y2.stride(0), eps)  # fmt: skip
    meta = {
        "RMS": rms,
        "HAS_BIAS": bias is not None,
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "NUM_STAGES": num_stages,
        "num_warps": num_warps,
    }
    _FORWARD.launch_persistent(triton.cdiv(n_rows, block_m), *args, waves=waves, **meta)
    return y, mean, rstd


def _sum_partials(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n_partials, n_cols = partials.shape
    out = torch.empty(n_cols, dtype=dtype, device=partials.device)
    _SUM_PARTIALS.launch_auto(
        (triton.cdiv(n_cols, PARTIAL_BLOCK_N),),
        partials, out, n_partials, n_cols, BLOCK_P=PARTIAL_BLOCK_P, BLOCK_N=PARTIAL_BLOCK_N, num_warps=4,
    )  # fmt: skip
    return out


def norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dx, dw, db) of RMSNorm (mean is None) or LayerNorm from the forward's mean and rstd. No autograd.

    dx has x's dtype, dw (and db, None without a bias) the weight's dtype.
    """
    if dy.shape != x.shape or dy.dtype != x.dtype or dy.device != x.device:
        raise ValueError(
            f"dy must match x in shape, dtype and device: x {tuple(x.shape)} {x.dtype} {x.device}, "
            f"dy {tuple(dy.shape)} {dy.dtype} {dy.device}"
        )
    x2, dy2 = as_rows(x, "x"), as_rows(dy, "dy")
    _check_params(x, weight, None)
    n_rows, n_cols = x2.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        db = torch.zeros_like(weight) if has_bias else None
        return dx, torch.zeros_like(weight), db
    dx2 = dx.view(n_rows, n_cols)
    if mean is not None and triton.next_power_of_2(n_cols) >= TWO_PASS_BACKWARD_FROM:
        return _layer_norm_backward_two_pass(dy2, x2, weight, mean, rstd, has_bias, dx)
    # x, dy, and the dw and db accumulators: four row-sized arrays live in registers. Tile, warps and
    # pipeline depth from a sweep on an H200 (see forward_launch): 8 warps and 3 stages keep two more row
    # blocks loading while one is reduced. With them the backward runs at 1.6-3.3x PyTorch on the H200 at
    # N = 1024-8192, where the occupancy rule alone (more warps, no pipelining) ran at 0.75-0.90x.
    block_n = triton.next_power_of_2(n_cols)
    tile = 8192 if block_n <= (1024 if mean is None else 4096) else 4096
    block_m, block_n, num_warps, num_stages = row_tile(
        n_cols, 2 * x.element_size(), live_rows=4, tile_elements=tile
    )
    if block_n < MAX_N:  # the longest rows keep the occupancy rule's 32 warps: with 8 they spill
        num_warps, num_stages = 8, 3
    meta = {
        "RMS": mean is None,
        "HAS_BIAS": has_bias,
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "NUM_STAGES": num_stages,
        "num_warps": num_warps,
    }

    def args(dw_partial: torch.Tensor, db_partial: torch.Tensor) -> tuple:
        return (x2, weight, dy2, dx2, rstd if mean is None else mean, rstd, dw_partial, db_partial,
                n_rows, n_cols, x2.stride(0), dy2.stride(0), dx2.stride(0))  # fmt: skip

    # The grid depends on the compiled kernel's occupancy, and the partial buffers on the grid: size the
    # grid with rstd (fp32, like the buffers) standing in for them.
    grid = persistent_grid(_norm_bwd_kernel, triton.cdiv(n_rows, block_m), args(rstd, rstd), meta)
    # Every program writes its whole partial row (zeros if it had no rows), so no zero-fill is needed.
    dw_partial = torch.empty(grid[0], n_cols, dtype=torch.float32, device=x.device)
    db_partial = torch.empty_like(dw_partial) if has_bias else dw_partial
    _BACKWARD.launch_auto(grid, *args(dw_partial, db_partial), **meta)
    dw = _sum_partials(dw_partial, weight.dtype)
    db = _sum_partials(db_partial, weight.dtype) if has_bias else None
    return dx, dw, db


def _layer_norm_backward_two_pass(
    dy2: torch.Tensor,
    x2: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    has_bias: bool,
    dx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """LayerNorm's backward for rows too long for one program's registers: row statistics, then columns."""
    n_rows, n_cols = x2.shape
    dx2 = dx.view(n_rows, n_cols)
    c1 = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    c2 = torch.empty_like(c1)
    _ROW_SUMS.launch_auto(
        (n_rows,), x2, weight, dy2, mean, rstd, c1, c2, n_cols, x2.stride(0), dy2.stride(0),
        BLOCK_N=TWO_PASS_ROW_BLOCK_N, num_warps=8,
    )  # fmt: skip
    block_m, block_n = TWO_PASS_TILE
    column_blocks = triton.cdiv(n_cols, block_n)
    # Enough row groups for about TWO_PASS_WAVES programs per SM; each group is one row of the partials.
    groups = max(1, min(triton.cdiv(n_rows, block_m), TWO_PASS_WAVES * sm_count(x2.device) // column_blocks))
    dw_partial = torch.empty(groups, n_cols, dtype=torch.float32, device=x2.device)
    db_partial = torch.empty_like(dw_partial) if has_bias else dw_partial
    _COLUMNS.launch_auto(
        (column_blocks, groups),
        x2, weight, dy2, dx2, mean, rstd, c1, c2, dw_partial, db_partial,
        n_rows, n_cols, x2.stride(0), dy2.stride(0), dx2.stride(0),
        HAS_BIAS=has_bias, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8,
    )  # fmt: skip
    dw = _sum_partials(dw_partial, weight.dtype)
    db = _sum_partials(db_partial, weight.dtype) if has_bias else None
    return dx, dw, db


class _Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms):  # type: ignore[override]
        y, mean, rstd = norm_forward(x, weight, bias, eps, rms)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, mean, rstd = ctx.saved_tensors
        # Autograd may hand over an expanded gradient (e.g. from .sum()): the kernel needs rows, so this
        # copies in that case only.
        dx, dw, db = norm_backward(dy.contiguous(), x, weight, mean, rstd, ctx.has_bias)
        if db is not None:
            db = db.to(ctx.bias_dtype)
        return dx, dw, db, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim with the fused Triton kernels; differentiable in x and weight.

    Like torch.nn.functional.rms_norm(x, (N,), weight, eps). Statistics in fp32; y in x's dtype.
    """
    return _Norm.apply(x, weight, None, eps, True)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over the last dim with the fused Triton kernels; differentiable in x, weight and bias.

    Like torch.nn.functional.layer_norm(x, (N,), weight, bias, eps). Statistics in fp32; y in x's dtype.
    """
    return _Norm.apply(x, weight, bias, eps, False)


# ----------------------------------------------------------------------------------------------------
# 5. Benchmark: GB/s against PyTorch's fused norms, on inputs far larger than L2
# ----------------------------------------------------------------------------------------------------
#
# bf16 inputs of 2^26 elements (128 MiB, well past an H100's 50 MiB L2) with hidden sizes N from 1024 to
# 16384. The minimal traffic is x and y (plus w, b, and the fp32 statistics, which are small): the goal
# for the forward is 85% of the measured device-copy bandwidth. The backward is timed through autograd on
# both sides (F.*_norm's backward and ours), reading x and dy and writing dx.

BANDWIDTH_GOAL = Goal("frac_measured_bw", ">=", 0.85, ">= 85% of copy BW")
BACKWARD_GOAL = Goal("speedup", ">=", 1.0, ">= 1.0x PyTorch")


def _cases(kernel: str, n_elements: int, sweep: list[int], device: torch.device) -> list[KernelCase]:
    rms = kernel == "rmsnorm"
    cases = []
    for n in sweep:
        x = torch.randn(n_elements // n, n, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, device=device, dtype=torch.bfloat16)
        b = None if rms else torch.randn(n, device=device, dtype=torch.bfloat16)
        stats_bytes = x.shape[0] * 4 * (1 if rms else 2)
        params_bytes = n * 2 * (1 if rms else 2)
        nbytes = 2 * x.numel() * 2 + stats_bytes + params_bytes
        if rms:
            ours = lambda x=x, w=w: norm_forward(x, w, None, 1e-6, rms=True)  # noqa: E731
            baseline = lambda x=x, w=w, n=n: F.rms_norm(x, (n,), w, 1e-6)  # noqa: E731
        else:
            ours = lambda x=x, w=w, b=b: norm_forward(x, w, b, 1e-5, rms=False)  # noqa: E731
            baseline = lambda x=x, w=w, b=b, n=n: F.layer_norm(x, (n,), w, b, 1e-5)  # noqa: E731
        goals = (BANDWIDTH_GOAL,) if x.numel() * 2 >= 128 * 2**20 else ()
        label = f"{x.shape[0]}x{n} bf16"
        baseline_name = "F.rms_norm" if rms else "F.layer_norm"
        cases.append(
            KernelCase(
                kernel=kernel,
                label=f"fwd {label}",
                x=n,
                ours=ours,
                baseline=baseline,
                baseline_name=baseline_name,
                bytes=nbytes,
                dtype=torch.bfloat16,
                goals=goals,
            )
        )

        # Backward through autograd: both graphs are built once and run again with retain_graph=True.
        leaves = [t.detach().requires_grad_() for t in ((x, w) if rms else (x, w, b))]
        graph_ours = rms_norm(*leaves) if rms else layer_norm(*leaves)
        graph_ref = (
            F.rms_norm(leaves[0], (n,), leaves[1], 1e-6)
            if rms
            else F.layer_norm(leaves[0], (n,), leaves[1], leaves[2], 1e-5)
        )
        dy = torch.randn_like(x)
        cases.append(
            KernelCase(
                kernel,
                f"bwd {label}",
                n,
                lambda g=graph_ours, leaves=leaves, dy=dy: torch.autograd.grad(
                    g, leaves, dy, retain_graph=True
                ),
                lambda g=graph_ref, leaves=leaves, dy=dy: torch.autograd.grad(
                    g, leaves, dy, retain_graph=True
                ),
                f"{baseline_name} backward",
                bytes=3 * x.numel() * 2 + stats_bytes + 2 * params_bytes,
                dtype=torch.bfloat16,
                goals=(BACKWARD_GOAL,),
            )
        )
    return cases


def benchmark_cases(quick: bool = False) -> list[KernelCase]:
    """RMSNorm and LayerNorm, forward and backward, bf16, over the hidden size N; GPU only."""
    device = require_gpu("norms benchmark")
    n_elements = 2**22 if quick else 2**26
    sweep = [1024, 4096] if quick else [1024, 2048, 4096, 8192, 16384]
    return _cases("rmsnorm", n_elements, sweep, device) + _cases("layernorm", n_elements, sweep, device)
