"""Matmul: a tiled, autotuned Triton GEMM with grouped tile order, a fused activation, TMA and split-K.

What you will learn: how a GEMM is cut into output tiles that each program accumulates over K on the
tensor cores (tl.dot); why the *order* in which tiles are handed out decides how often A and B come from
L2 instead of DRAM; how an elementwise activation is fused into the epilogue for free; how Hopper's Tensor
Memory Accelerator (TMA) and a persistent grid close the last gap to cuBLAS; and why a skinny,
decode-shaped product (a few rows, a long K) needs its K split across programs to fill the GPU.

    y = act(a @ b)      a: (..., K), b: (K, N), y: (..., N); act in {None, "relu", "gelu_tanh", "silu"}

Three kernels, one entry point (matmul() picks):

- _matmul_kernel: the portable one. Pointer arithmetic, any strides (so the backward can pass
  transposed views), masks at the edges. Runs everywhere, including Triton's CPU interpreter.
- _matmul_tma_kernel: Hopper and later, fp16/bf16, 16-byte aligned rows. Tiles are moved by the TMA
  unit (no address arithmetic in the kernel, out-of-bounds handled by the hardware) and a persistent
  grid of one program per SM walks the tiles, so the epilogue of one tile overlaps the loads of the next.
- _matmul_split_k_kernel: skinny products (decode: M = 1..64 tokens, or few output tiles and a long
  K). Tiles as short as M needs (16 rows, tl.dot's minimum, for M <= 16), so the weight is read once,
  and K split over SPLIT_K programs per tile until there are about two programs per SM; the last slice
  of each tile to finish adds them up, in slice order (deterministic), in the same launch. With
  SPLIT_K = 1 it is a plain small-M GEMM.

Which kernel (matmul_forward's plan, section 6): M <= SMALL_M_MAX rows, or a split chosen or asked for,
take the split-K kernel; otherwise the TMA kernel where it applies, else the portable one.

Precision (see PRECISION POLICY below): fp16/bf16 inputs, fp32 accumulation, output in the input dtype.
fp32 inputs follow torch.get_float32_matmul_precision(), like torch.matmul.

    pytest tests/kernels/test_matmul.py             # add -m gpu on a GPU machine
    effdl bench kernels --kernel matmul             # TFLOP/s against cuBLAS (torch.matmul)
    effdl bench kernels --kernel matmul_decode      # Llama decode shapes: split-K, unsplit and cuBLAS
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# The context variable behind triton.set_allocator: set around our launches only, so that an allocator the
# caller set for their own kernels is left as it was.
from triton.runtime._allocation import _allocator as triton_allocator
from triton.tools.tensor_descriptor import TensorDescriptor

from common.bench import compare
from common.kernels import INTERPRETED, check_input, sm_count
from common.kernels.benchmark import Goal, KernelCase, require_gpu
from common.kernels.launch import LaunchCache, tensor_key
from common.kernels.workspace import StreamWorkspace, current_raw_stream

__all__ = [
    "ACTIVATIONS",
    "benchmark_cases",
    "decode_benchmark_cases",
    "fp32_input_precision",
    "matmul",
    "matmul_forward",
    "matmul_reference",
]

# ----------------------------------------------------------------------------------------------------
# 1. The reference, and what an unfused activation costs
# ----------------------------------------------------------------------------------------------------

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
}


def matmul_reference(a: torch.Tensor, b: torch.Tensor, activation: str | None = None) -> torch.Tensor:
    """act(a @ b) in PyTorch: the GEMM writes z (M x N), then the activation reads it back and writes y.

    For a 4096^3 bf16 GEMM that round trip is 3 x 32 MiB of extra traffic, ~30 us on an H100, on top of a
    ~180 us GEMM: ~15%. The fused epilogue applies act to the fp32 accumulator while it is still in
    registers and writes only y.
    """
    z = a @ b
    return z if activation is None else ACTIVATIONS[activation](z)


# ----------------------------------------------------------------------------------------------------
# 2. Pieces shared by the kernels: tile order and the activation epilogue
# ----------------------------------------------------------------------------------------------------
#
# Grouped tile order. Program t computes output tile (pid_m, pid_n). In row-major order, consecutive
# programs (which run at the same time) sweep a whole row of tiles: they share one block-row of A but
# each needs a different block-column of B, so all of B streams through L2 for every row of tiles.
# Grouping GROUP_M rows of tiles and walking them column by column makes a wave of programs cover a
# roughly square patch of C: it needs GROUP_M block-rows of A and a few block-columns of B, which stay in
# L2 while the wave reuses them. On large GEMMs this is worth ~10% (more DRAM traffic otherwise).


@triton.jit
def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile number `tile`, in grouped order."""
    tiles_per_group = GROUP_M * num_n
    first_m = (tile // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)  # the last group may be shorter
    pid_m = first_m + (tile % tiles_per_group) % group_rows
    pid_n = (tile % tiles_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    """The epilogue: applied to the fp32 accumulator; a constexpr, so the unused branches vanish."""
    if ACTIVATION == "relu":
        x = tl.maximum(x, 0.0)
    elif ACTIVATION == "gelu_tanh":
        # 0.5 * (1 + tanh(u)) == sigmoid(2u), with u = sqrt(2/pi) * (x + 0.044715 x^3): one exp, no tanh.
        x = x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
    elif ACTIVATION == "silu":
        x = x * tl.sigmoid(x)
    return x


@triton.jit
def _store_output(y_ptr, z_ptr, offsets, acc, mask, ACTIVATION: tl.constexpr, STORE_Z: tl.constexpr):
    """The pointer kernels' last step: y = act(acc) and, if asked, z = acc (the pre-activation, which
    the backward needs), each rounded once to the output dtype."""
    if STORE_Z:
        tl.store(z_ptr + offsets, acc.to(z_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + offsets, _activation(acc, ACTIVATION).to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# 3. The portable kernel
# ----------------------------------------------------------------------------------------------------
#
# Each program owns a BLOCK_M x BLOCK_N tile of y and walks K in steps of BLOCK_K: load a BLOCK_M x BLOCK_K
# slab of A and a BLOCK_K x BLOCK_N slab of B, tl.dot them into an fp32 accumulator. Arithmetic intensity
# per program is 2·BM·BN·BK FLOPs over (BM + BN)·BK elements loaded: bigger tiles reuse each loaded value
# more, until registers (the accumulator: BM·BN fp32 over num_warps·32 threads) and shared memory
# (num_stages pipelined slabs of A and B) run out. Those trade-offs are what autotuning searches.
#
# Autotuning: @triton.autotune compiles and times every config the first time it sees a new (M, N, K)
# (and dtypes), then reuses the winner. The configs are Hopper-sized (H100: 227 KB of shared memory per
# block, 64K registers per SM): 128x256x64 with 8 warps (two warpgroups, each holding a 64x256 fp32
# accumulator in 128 registers per thread) and 3 stages keeps 48 KB of A and B per stage in flight.
# Configs that do not fit (fp32 inputs with big tiles) fail with OutOfResources and the tuner skips them.
# Under the interpreter a single small config is used: there is nothing to time, and small tiles test the
# masks. Expect the first call at a new shape on a GPU to take seconds (compiling and timing each config).


def _config(
    bm: int,
    bn: int,
    bk: int,
    warps: int,
    stages: int,
    group_m: int | None = 8,
    pre_hook: Callable | None = None,
) -> triton.Config:
    blocks = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
    if group_m is not None:  # the split-K kernel has no tile order to group
        blocks["GROUP_M"] = group_m
    return triton.Config(blocks, num_warps=warps, num_stages=stages, pre_hook=pre_hook)


INTERPRETER_CONFIG = _config(32, 32, 16, 4, 1, group_m=2)

BLOCKED_CONFIGS = [
    _config(128, 256, 64, 8, 3),
    _config(256, 128, 64, 8, 3),
    _config(128, 128, 64, 8, 4),
    _config(128, 128, 64, 4, 4),
    _config(128, 64, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(128, 128, 32, 4, 4),
    _config(64, 64, 32, 4, 4),
]


@triton.autotune(configs=[INTERPRETER_CONFIG] if INTERPRETED else BLOCKED_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _matmul_kernel(
    a_ptr,
    b_ptr,
    y_ptr,
    z_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_ym,
    stride_yn,
    ACTIVATION: tl.constexpr,
    STORE_Z: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    # int64 row offsets: M x K can pass 2^31 elements.
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K  # the last slab is ragged; padding loads 0 and adds nothing
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    offsets = offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    _store_output(y_ptr, z_ptr, offsets, acc, m_mask[:, None] & n_mask[None, :], ACTIVATION, STORE_Z)


# ----------------------------------------------------------------------------------------------------
# 4. Hopper: TMA descriptors and a persistent grid
# ----------------------------------------------------------------------------------------------------
#
# A tensor descriptor tells the TMA unit a tensor's base, shape, strides and the block to move; `desc.load`
# then copies a whole tile into shared memory asynchronously, with no per-thread address math, and fills
# out-of-bounds elements with 0 (stores past the edge are dropped). The price: row strides must be
# multiples of 16 bytes and the last dim contiguous, so this path takes fp16/bf16 with K and N multiples
# of 8. The grid is persistent (one program per SM, looping over tiles in grouped order); with
# `flatten=True` the compiler pipelines the two loops as one, prefetching the next tile's first slabs
# during this tile's epilogue. Shared memory sets the depth of the pipeline: 128x256x64 in bf16 takes
# 48 KB of A and B slabs per stage plus 64 KB to stage y for the TMA store, so 3 stages (208 KB) fit in an
# H100's 227 KB per block and 4 would not; 128x128x64 affords 4.
#
# Where the descriptors are made is a trade between host and GPU time:
# - on the host (TensorDescriptor), passed to the kernel as launch parameters: ~13 µs of Python to build
#   four, and Triton's launcher encodes each one with the driver on every call. In a probe on an H200 a
#   1024^3 call cost 39 µs of host time this way, 19 µs with descriptors made on the GPU. Block shapes
#   are chosen by the autotuner, so a pre-hook writes them into the descriptors before every launch.
# - on the GPU (tl.make_tensor_descriptor, DEVICE_DESCRIPTORS=True): each program writes its descriptors
#   into global scratch memory that Triton asks our allocator for (a reused workspace, workspace.py). No
#   host cost, but the kernel is slower: 0.93x cuBLAS against 0.98-1.0x at 2048^3, 0.97x against 0.99x
#   at 4096^3, equal at 8192^3 (same probe).
# So small GEMMs, whose GPU time (~11 µs at 1024^3) is less than the host's, make them on the GPU, and
# large ones, where the host is far ahead of the GPU, on the host (DEVICE_DESCRIPTOR_MAX_WORK).


def _set_tma_block_shapes(nargs: dict) -> None:
    """Autotuner pre-hook: give host-side descriptors the block shapes of the config about to run."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a"].block_shape = [bm, bk]
    nargs["b"].block_shape = [bk, bn]
    nargs["y"].block_shape = [bm, bn]
    nargs["z"].block_shape = [bm, bn]


def _tma_configs(pre_hook: Callable | None) -> list[triton.Config]:
    if INTERPRETED:
        return [_config(32, 32, 16, 4, 1, group_m=2, pre_hook=pre_hook)]
    return [
        _config(bm, bn, bk, warps, stages, pre_hook=pre_hook)
        for bm, bn, bk, warps, stages in [
            (128, 256, 64, 8, 3),
            (256, 128, 64, 8, 3),
            (128, 128, 64, 8, 4),
            (128, 128, 64, 4, 4),
            (128, 128, 128, 8, 3),
        ]
    ]


@triton.jit
def _matmul_tma_kernel(
    a,
    b,
    y,
    z,
    M,
    N,
    K,
    stride_am,
    stride_bk,
    stride_ym,
    ACTIVATION: tl.constexpr,
    STORE_Z: tl.constexpr,
    NUM_SMS: tl.constexpr,
    DEVICE_DESCRIPTORS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # a, b, y, z are host-made descriptors, or (DEVICE_DESCRIPTORS) pointers to make them from here.
    if DEVICE_DESCRIPTORS:
        a = tl.make_tensor_descriptor(a, [M, K], [stride_am, 1], [BLOCK_M, BLOCK_K])
        b = tl.make_tensor_descriptor(b, [K, N], [stride_bk, 1], [BLOCK_K, BLOCK_N])
        y = tl.make_tensor_descriptor(y, [M, N], [stride_ym, 1], [BLOCK_M, BLOCK_N])
        if STORE_Z:
            z = tl.make_tensor_descriptor(z, [M, N], [stride_ym, 1], [BLOCK_M, BLOCK_N])
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_tiles):
            a_tile = a.load([off_m, k * BLOCK_K])
            b_tile = b.load([k * BLOCK_K, off_n])
            acc = tl.dot(a_tile, b_tile, acc)
        if STORE_Z:
            z.store([off_m, off_n], acc.to(z.dtype))
        y.store([off_m, off_n], _activation(acc, ACTIVATION).to(y.dtype))


# One kernel, autotuned twice: host-made descriptors need the pre-hook before every launch, device-made
# ones must not pay for it.
_matmul_tma_host_descriptors = triton.autotune(_tma_configs(_set_tma_block_shapes), key=["M", "N", "K"])(
    _matmul_tma_kernel
)
_matmul_tma_device_descriptors = triton.autotune(_tma_configs(None), key=["M", "N", "K"])(_matmul_tma_kernel)


# ----------------------------------------------------------------------------------------------------
# 5. Skinny products: small-M tiles and split-K
# ----------------------------------------------------------------------------------------------------
#
# Decode multiplies a handful of token rows by a weight: y (M x N) = a (M x K) @ w (K x N), M = 1..64.
# It does 2·M·N·K FLOPs on ~2·K·N bytes of bf16 weight (a and y are M rows: small), about M FLOPs per
# byte, while an H200's datasheet ridge is 989 TFLOP/s / 4.8 TB/s ~ 206 FLOPs per byte. So the product
# is bound by reading the weight, up to M ~ 200, and the kernel is good when it reads it once, at close
# to DRAM bandwidth. Two things decide that:
#
# - Tile height. A tile of BLOCK_M rows reads its column block of the weight once per row of tiles, so
#   the weight is read ceil(M / BLOCK_M) times; a tile taller than M pads it with masked rows that cost
#   tensor-core work and shared memory for the A slab and buy nothing. The big-M kernels' 128-row tiles
#   spend 1 - M/128 of their MMA work on padding (99% at M = 1, 88% at M = 16) and, worse, make few
#   tiles: N / BLOCK_N, 16 to 32 for N = 4096, on 132 SMs. Here BLOCK_M is the smallest of 16 (tl.dot's
#   minimum), 32 and 64 that covers M: one row of tiles, the weight read once, and the tile's width spent
#   on what matters, a wide BLOCK_N and a long BLOCK_K with a deep pipeline, so that every program keeps
#   tens of KB of the weight in flight.
# - Programs per SM. Even with narrow tiles there are few of them: M = 16, N = 4096 makes 32 tiles of
#   16 x 128, and one program per tile walking all of K would leave three quarters of the GPU idle.
#   Split-K gives each tile SPLIT_K programs, one per K-slice, up to about two programs per SM (so that
#   each SM has two streams of the weight in flight: see SPLIT_K_WAVES). Each writes its fp32 partial
#   tile to a (SPLIT_K, M, N) buffer; the extra traffic (SPLIT_K x M x N x 4 bytes, written and read
#   once) is small next to the K x N weight.
#
# Between M = 64 and the ridge (~200 rows) the weight still sets the time, but one row of tiles would
# need accumulators of 128 to 256 rows, which leave few registers for the pipeline; tiles of 64 and 128
# rows run there, the rows of tiles of one weight slab next to each other in the grid (axis 0, the
# fastest), so that its second read comes from L2. Those M take this kernel only when the split rule
# finds too few tiles for the GPU; otherwise the big-M kernels do.
#
# Who adds the slices up? A second kernel would cost a second launch: ~10 µs of host time, as much as the
# GPU work of a small decode GEMM. Atomic adds onto y would make the float sum's order, so the result, vary
# from run to run. Instead each program, once its partial is written, takes a ticket from a per-tile
# counter (an atomic add); the program that draws the last ticket knows every slice is in memory, sums
# them in slice order (deterministic, whoever finishes last), applies the activation and writes y. It then
# puts the counter back to 0, so the counters (a zeroed workspace, reused across calls) are ready for the
# next launch. The ordering that makes this correct: a barrier, so that all of the program's threads have
# stored their part of the partial before the ticket is taken; the ticket taken with release-acquire
# semantics at GPU scope, so that the last program sees the other programs' stores; and the partials read
# back from L2 (".cg"), not from a possibly stale L1. With one slice (ONE_SLICE) there is nothing to add:
# the program writes y directly, like the portable kernel.

# Under the interpreter: 16-row tiles, the small-M tile, which also leaves ragged rows for M = 17 or 37.
SPLIT_K_INTERPRETER_CONFIG = _config(16, 32, 16, 4, 1, group_m=None)
# A skinny product streams the weight: the configs differ in how much of it each program keeps in flight
# (BLOCK_K x BLOCK_N x (stages - 1) elements) and how long its contiguous runs along N are (BLOCK_N x 2
# bytes in bf16: 128 to 512 bytes per row of B), which is what decides how close to DRAM bandwidth it gets.
# Shared memory, from compiling these for sm_90 in bf16: 60 to 192 KiB per program, the larger of the
# pipeline's slabs of A and B and the last slice's buffered fp32 partial tiles. Up to ~113 KiB two
# programs share an SM's 228 KiB; the larger configs keep more of the weight in flight in one program.
# The tuner weighs the two. A config that does not fit (fp32 inputs) fails with OutOfResources and the
# tuner skips it.
SPLIT_K_CONFIGS = [
    _config(bm, bn, bk, warps, stages, group_m=None)
    for bm, bn, bk, warps, stages in [
        (16, 64, 128, 4, 4),
        (16, 64, 256, 4, 4),
        (16, 128, 128, 4, 4),
        (16, 128, 64, 4, 6),
        (16, 128, 256, 4, 3),
        (16, 256, 64, 4, 4),
        (16, 256, 64, 8, 5),
        (16, 256, 128, 8, 3),
        (32, 64, 128, 4, 4),
        (32, 128, 64, 4, 4),
        (32, 128, 128, 4, 4),
        (32, 256, 64, 8, 4),
        (64, 64, 64, 4, 4),
        (64, 128, 64, 4, 3),
        (64, 128, 128, 4, 3),
        (64, 256, 64, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 128, 128, 8, 3),
    ]
]


def skinny_tile_rows(m: int) -> tuple[int, ...]:
    """The tile heights (BLOCK_M) the split-K kernel may use for M rows: the smallest of 16, 32, 64 that
    covers M (one row of tiles: the weight is read once), or 64 and 128 above 64 rows."""
    if m <= 64:
        return (max(16, triton.next_power_of_2(m)),)
    return (64, 128)


def _prune_split_k_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep the configs whose tile height suits M (skinny_tile_rows); the first config if none does."""
    rows = skinny_tile_rows(named_args["M"])
    return [c for c in configs if c.kwargs["BLOCK_M"] in rows] or configs[:1]


@triton.autotune(
    configs=[SPLIT_K_INTERPRETER_CONFIG] if INTERPRETED else SPLIT_K_CONFIGS,
    key=["M", "N", "K", "SPLIT_K"],
    prune_configs_by={"early_config_prune": _prune_split_k_configs},
)
@triton.jit
def _matmul_split_k_kernel(
    a_ptr,
    b_ptr,
    y_ptr,
    z_ptr,
    partial_ptr,
    tickets_ptr,
    M,
    N,
    K,
    SPLIT_K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    ACTIVATION: tl.constexpr,
    STORE_Z: tl.constexpr,
    PRECISION: tl.constexpr,
    ONE_SLICE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # Slices are whole BLOCK_K steps: slice s covers steps [s * per_slice, (s + 1) * per_slice).
    k_steps = tl.cdiv(K, BLOCK_K)
    per_slice = tl.cdiv(k_steps, SPLIT_K)
    first = pid_k * per_slice
    last = tl.minimum(first + per_slice, k_steps)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = first * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(first, last):
        k_mask = offs_k < K
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        offs_k += BLOCK_K
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    mask = m_mask[:, None] & n_mask[None, :]
    tile_offsets = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]  # y, z and each partial are M x N
    if ONE_SLICE:
        _store_output(y_ptr, z_ptr, tile_offsets, acc, mask, ACTIVATION, STORE_Z)
    else:
        # Every slice writes its tile, zeros if it got no K steps, so the buffer needs no zero-fill.
        tl.store(partial_ptr + pid_k.to(tl.int64) * M * N + tile_offsets, acc, mask=mask)
        # The last slice to finish sums them all, in slice order.
        tl.debug_barrier()
        ticket_ptr = tickets_ptr + pid_m * tl.num_programs(1) + pid_n
        if tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            part_ptrs = partial_ptr + tile_offsets
            for _ in tl.range(SPLIT_K, num_stages=3):  # pipelined: the next slices load during this add
                total += tl.load(part_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
                part_ptrs += M * N
            _store_output(y_ptr, z_ptr, tile_offsets, total, mask, ACTIVATION, STORE_Z)
            tl.store(ticket_ptr, 0)  # ready for the next launch


# ----------------------------------------------------------------------------------------------------
# 6. PRECISION POLICY, checks, dispatch
# ----------------------------------------------------------------------------------------------------
#
# - fp16/bf16 inputs: products on the tensor cores, accumulated in fp32, rounded once to the output dtype
#   (as cuBLAS does). Relative error per output element ~ one rounding of the output (2^-8 for bf16,
#   2^-11 for fp16), plus fp32 accumulation error (~sqrt(K) x 2^-24), which is negligible.
# - fp32 inputs: tl.dot on a GPU defaults to TF32 (inputs rounded to 10 mantissa bits: relative error
#   ~2^-11 per product, ~1e-3 on a K = 1024 dot product), which torch.matmul does not use by default. So
#   the kernel follows torch.get_float32_matmul_precision(): "highest" (PyTorch's default) means
#   input_precision="ieee" (exact fp32 FMAs on the CUDA cores, whose peak on an H100 is 1/7 of TF32's),
#   "high" or "medium" mean "tf32", the same trade torch.matmul makes under that setting. Pass
#   input_precision= to choose explicitly.
# - Under the interpreter, tl.dot is a numpy fp32 matmul whatever input_precision says.

INPUT_PRECISIONS = ("ieee", "tf32", "tf32x3")
# Split-K pays when the regular grid leaves SMs idle and K is long enough for slices of >= 512. A skinny
# product is a stream of the weight from DRAM, and one program per SM cannot keep enough of it in flight
# (Little's law: ~3 TB/s x ~1 us of latency is ~3 MB, ~23 KB per SM, beyond what one program's pipeline
# holds while it also waits on its own dot products): the split aims at SPLIT_K_WAVES programs per SM.
SPLIT_K_TILE = (64, 128)  # the tile size the auto rule assumes, close to what the tuner picks
SPLIT_K_WAVES = 2
MIN_SPLIT_K_SLICE = 512
MAX_SPLIT_K = 16
# Up to this many rows the split-K kernel runs whatever the split (one slice included): its short tiles
# read the weight once (section 5), where the big-M kernels' 64- to 256-row tiles pad M and make too few
# tiles to fill the GPU. Above it, the big-M kernels unless the auto rule splits K.
SMALL_M_MAX = 64


def fp32_input_precision() -> str:
    """The tl.dot input_precision that matches torch.matmul for fp32 under the current PyTorch setting."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _check(a: torch.Tensor, b: torch.Tensor, activation: str | None, split_k: int | None) -> None:
    check_input(a, "a")
    check_input(b, "b")
    if a.dim() < 2 or b.dim() != 2:
        raise ValueError(
            f"matmul takes a of shape (..., M, K) and b of shape (K, N); got a {tuple(a.shape)}, "
            f"b {tuple(b.shape)}"
        )
    if a.shape[-1] != b.shape[0]:
        raise ValueError(
            f"inner dimensions differ: a is {tuple(a.shape)} (K = {a.shape[-1]}), b is {tuple(b.shape)} "
            f"(K = {b.shape[0]}); a's last dim must equal b's first"
        )
    if a.dtype != b.dtype:
        raise TypeError(f"a is {a.dtype} but b is {b.dtype}: cast one, e.g. b.to({a.dtype})")
    if a.device != b.device:
        raise ValueError(f"a is on {a.device} but b is on {b.device}: move them to one device")
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; use None or one of {sorted(ACTIVATIONS)}")
    if split_k is not None and (not isinstance(split_k, int) or isinstance(split_k, bool) or split_k < 1):
        raise ValueError(f"split_k must be a positive int (1: no split) or None (choose), got {split_k!r}")


def _auto_split_k(m: int, n: int, k: int, device: torch.device) -> int:
    tiles = triton.cdiv(m, SPLIT_K_TILE[0]) * triton.cdiv(n, SPLIT_K_TILE[1])
    sms = sm_count(device)
    if tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(SPLIT_K_WAVES * sms, tiles), k // MIN_SPLIT_K_SLICE, MAX_SPLIT_K))


def _tma_ok(a2: torch.Tensor, b: torch.Tensor) -> str | None:
    """Why the TMA kernel can't take these inputs, or None if it can."""
    if a2.dtype not in (torch.float16, torch.bfloat16):
        return f"the TMA path takes fp16/bf16, not {a2.dtype}"
    if not INTERPRETED and (a2.device.type != "cuda" or torch.cuda.get_device_capability(a2.device) < (9, 0)):
        return "TMA needs a Hopper (sm_90) or newer GPU"
    size = a2.element_size()
    for name, t in (("a", a2), ("b", b)):
        if t.stride(1) != 1 or (t.stride(0) * size) % 16 or t.data_ptr() % 16:
            return f"{name} must be row-major with 16-byte aligned rows (its strides are {t.stride()})"
    if (b.shape[1] * size) % 16:
        return f"N = {b.shape[1]} must be a multiple of {16 // size} for 16-byte aligned output rows"
    return None


# Host time. Triton's Python launch path (autotuner key, argument binding and specialisation, grid) costs
# ~150 µs per call; a 1024³ GEMM takes ~11 µs on the GPU. So every decision that depends only on the
# inputs' geometry (which kernel, how many K-slices, where TMA descriptors are made, the checks) is made
# once per geometry and kept in _PLANS, and each kernel is launched through a LaunchCache (launch.py),
# which calls the compiled kernel's C launcher directly after the first call, with tensors passed as
# addresses. What is left per call: the key and its lookup (~2 µs in a probe on an H100's host), the output
# allocation (3 to 6 µs), and the C launcher (~6 to 8 µs); scratch memory comes from per-stream
# workspaces (workspace.py) instead of an allocation per call. torch.matmul cost 13 µs at 1024³ in the same
# probe. `effdl bench kernels --kernel matmul` measures ours (HOST_GOAL): on an H100, 17.9 and 18.0 µs at
# 1024³ and 2048³ and 14.4 to 17.2 µs at the decode shapes, against torch.matmul's 11.4 to 14.4 µs
# (benchmarks/results/nvidia-h100-80gb-hbm3/kernels_matmul.json).

# Below this many multiply-adds (M·N·K) the TMA kernel makes its descriptors on the GPU (section 4).
DEVICE_DESCRIPTOR_MAX_WORK = 2048**3


@dataclass(frozen=True)
class _Plan:
    """How matmul_forward runs inputs of one geometry: the path, and the constexprs it launches with."""

    path: str  # "empty" | "split_k" (small M, or K split: splits may be 1) | "tma" | "portable"
    activation: str
    precision: str
    splits: int
    device_descriptors: bool  # the TMA path: descriptors made on the GPU (no host cost) or on the host
    tickets: int  # the split-K path: per-tile counters needed by the config with the most tiles


_PLANS: dict[tuple, _Plan] = {}
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_PORTABLE = LaunchCache(_matmul_kernel)
_TMA_HOST_DESCRIPTORS = LaunchCache(_matmul_tma_host_descriptors)
_TMA_DEVICE_DESCRIPTORS = LaunchCache(_matmul_tma_device_descriptors)
_SPLIT_K = LaunchCache(_matmul_split_k_kernel)
_PARTIALS = StreamWorkspace(torch.float32)
_TICKETS = StreamWorkspace(torch.int32, zeroed=True)
_DESCRIPTOR_SCRATCH = StreamWorkspace(torch.uint8)


def _plan_key(a: object, b: object, *options: object) -> tuple | None:
    """Everything a plan and a compiled kernel depend on (tensor_key's geometry and device of a and b, the
    fp32 matmul setting, the options); None (no caching) unless both are plain tensors (a subclass may
    change what shape, strides or data_ptr report)."""
    if type(a) not in _PLAIN_TENSORS or type(b) not in _PLAIN_TENSORS:
        return None
    fp32_setting = torch.get_float32_matmul_precision() if a.dtype == torch.float32 else None
    return (*tensor_key(a, b), fp32_setting, *options)


def _make_plan(a, b, activation, split_k, use_tma, input_precision) -> _Plan:
    """Check the inputs (clear errors) and choose the kernel; runs once per geometry."""
    _check(a, b, activation, split_k)
    if input_precision is not None and input_precision not in INPUT_PRECISIONS:
        raise ValueError(
            f"input_precision must be one of {INPUT_PRECISIONS} or None, got {input_precision!r}"
        )
    if split_k is not None and split_k > 1 and use_tma:
        raise ValueError("use_tma=True and split_k > 1 don't combine: the TMA kernel does not split K")
    a2 = _rows(a, b.shape[0])
    (m, k), n = a2.shape, b.shape[1]
    act = activation or "none"
    precision = (input_precision or fp32_input_precision()) if a.dtype == torch.float32 else "tf32"
    plan = functools.partial(_Plan, activation=act, precision=precision, device_descriptors=False, tickets=0)
    if m == 0 or n == 0 or k == 0:
        return plan("empty", splits=1)
    splits = split_k if split_k is not None else 1 if use_tma else _auto_split_k(m, n, k, a.device)
    if splits > 1 or (m <= SMALL_M_MAX and not use_tma):
        configs = _matmul_split_k_kernel.configs
        tiles = max(
            triton.cdiv(m, c.kwargs["BLOCK_M"]) * triton.cdiv(n, c.kwargs["BLOCK_N"]) for c in configs
        )
        return plan("split_k", splits=splits, tickets=tiles if splits > 1 else 0)
    tma_problem = _tma_ok(a2, b) if use_tma is not False else "not asked for"
    if use_tma and tma_problem is not None:
        raise ValueError(f"use_tma=True, but {tma_problem}; pass use_tma=None to let matmul choose")
    if use_tma or (use_tma is None and not INTERPRETED and tma_problem is None):
        return plan("tma", splits=1, device_descriptors=m * n * k <= DEVICE_DESCRIPTOR_MAX_WORK)
    return plan("portable", splits=1)


def _rows(a: torch.Tensor, k: int) -> torch.Tensor:
    """a as (rows, K) without a copy, or a clear error."""
    if a.dim() == 2:
        return a
    try:
        return a.view(math.prod(a.shape[:-1]), k)  # (..., M, K) -> (rows, K)
    except RuntimeError as err:
        raise ValueError(
            f"a with shape {tuple(a.shape)} and strides {a.stride()} can't be viewed as rows of K: "
            "pass a.contiguous()"
        ) from err


def _launch_split_k(key, a2, b, y, z, plan: _Plan) -> None:
    m, k = a2.shape
    n = b.shape[1]
    splits = plan.splits
    key = None if key is None else (key, splits)  # one geometry may be timed with two splits (_timed_split)
    if splits == 1:  # no partials to add up: the kernel never touches these two (any tensor will do)
        partials, tickets = y, y
    else:
        stream = current_raw_stream(a2.device) if a2.is_cuda else 0
        partials = _PARTIALS.get(splits * m * n, a2.device, stream)
        tickets = _TICKETS.get(plan.tickets, a2.device, stream)

    def grid(meta: dict) -> tuple[int, int, int]:
        return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), splits

    _SPLIT_K.launch(
        key, grid, a2, b, y, z, partials, tickets, m, n, k, splits,
        a2.stride(0), a2.stride(1), b.stride(0), b.stride(1),
        ACTIVATION=plan.activation, STORE_Z=z is not y, PRECISION=plan.precision, ONE_SLICE=splits == 1,
    )  # fmt: skip


def _launch_tma(key, a2, b, y, z, plan: _Plan) -> None:
    m, k = a2.shape
    n = b.shape[1]
    num_sms = sm_count(a2.device)

    def grid(meta: dict) -> tuple[int]:
        return (min(num_sms, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),)

    strides = (a2.stride(0), b.stride(0), y.stride(0))
    constexprs = {"ACTIVATION": plan.activation, "STORE_Z": z is not y, "NUM_SMS": num_sms}
    if plan.device_descriptors:
        token = triton_allocator.set(_DESCRIPTOR_SCRATCH.allocator)
        try:
            _TMA_DEVICE_DESCRIPTORS.launch(
                key, grid, a2, b, y, z, m, n, k, *strides, DEVICE_DESCRIPTORS=True, **constexprs
            )
        finally:
            triton_allocator.reset(token)
    else:
        # The block shapes given here are placeholders: the chosen config's pre-hook sets them.
        descriptors = [TensorDescriptor.from_tensor(t, [16, 16]) for t in (a2, b, y, z)]
        _TMA_HOST_DESCRIPTORS.launch(
            key, grid, *descriptors, m, n, k, *strides, DEVICE_DESCRIPTORS=False, **constexprs
        )


def _launch_portable(key, a2, b, y, z, plan: _Plan) -> None:
    m, k = a2.shape
    n = b.shape[1]

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _PORTABLE.launch(
        key, grid, a2, b, y, z, m, n, k,
        a2.stride(0), a2.stride(1), b.stride(0), b.stride(1), y.stride(0), y.stride(1),
        ACTIVATION=plan.activation, STORE_Z=z is not y, PRECISION=plan.precision,
    )  # fmt: skip


_LAUNCHERS = {"split_k": _launch_split_k, "tma": _launch_tma, "portable": _launch_portable}


def _split_speedup(one_slice: Callable[[], None], split: Callable[[], None], device: torch.device) -> float:
    """How much faster the split launch runs than the one-slice launch (> 1: the split), interleaved."""
    return compare(one_slice, split, cache="warm", warmup_ms=5.0, rep_ms=30.0, device=device).speedup


def _timed_split(key, a2, b, y, z, split: _Plan, one_slice: _Plan) -> _Plan:
    """The auto rule's split or split_k=1's plan, whichever runs faster here, timed once per geometry.

    The rule counts tiles against SMs, but whether a split pays also depends on how much of the weight each
    program keeps in flight, which the tuner's config decides: on an H100, on Llama-3-8B's layer shapes at
    M <= 16, the rule's 3 to 9 slices ran 2 to 10% slower than one slice; at M = 32 to 128, against
    split_k=1, up to 29% faster on the down and output projections and up to 14% slower on the up one."""
    one_launch, split_launch = (
        functools.partial(_LAUNCHERS[p.path], key, a2, b, y, z, p) for p in (one_slice, split)
    )
    return split if _split_speedup(one_launch, split_launch, a2.device) > 1 else one_slice


def _split_to_time(plan: _Plan, split_k: int | None, a: torch.Tensor) -> bool:
    """Whether plan is the auto rule's split on a GPU, which _timed_split checks against split_k=1's plan."""
    return split_k is None and plan.path == "split_k" and plan.splits > 1 and a.is_cuda and not INTERPRETED


def _forward_key(
    a, b, activation=None, split_k=None, use_tma=None, input_precision=None, preactivation=False
):
    """matmul_forward's plan key for these arguments (None: its plans are not cached)."""
    return _plan_key(a, b, activation, split_k, use_tma, input_precision, preactivation)


def matmul_forward(
    a: torch.Tensor,
    b: torch.Tensor,
    activation: str | None = None,
    *,
    split_k: int | None = None,
    use_tma: bool | None = None,
    input_precision: str | None = None,
    store_preactivation: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(act(a @ b), a @ b or None) with the Triton kernels; no autograd.

    split_k: slices of K (1: none); None chooses: splits only when the output has too few tiles to fill
        the GPU, and on a GPU only if that split ran faster than split_k=1's plan when timed at the
        geometry's first call (_timed_split); never with use_tma=True. Up to SMALL_M_MAX rows the
        split-K kernel's short tiles run whatever the split, one slice included.
    use_tma: force the TMA kernel on or off; None uses it where it applies (Hopper or newer, fp16/bf16,
        16-byte aligned rows) on products the split-K kernel does not take; never under the interpreter
        unless forced.
    input_precision: for fp32 inputs only, "ieee" | "tf32" | "tf32x3"; None follows
        torch.get_float32_matmul_precision() (see the precision policy above).
    store_preactivation: also return z = a @ b (in the output dtype), which the backward needs.
    """
    key = _forward_key(a, b, activation, split_k, use_tma, input_precision, store_preactivation)
    plan = _PLANS.get(key) if key is not None else None
    new_plan = plan is None
    if new_plan:
        plan = _make_plan(a, b, activation, split_k, use_tma, input_precision)  # checks the inputs
    k, n = b.shape
    a2 = _rows(a, k)
    y = a2.new_empty((a2.shape[0], n))
    # Without store_preactivation, z aliases y and the kernels skip storing it (STORE_Z = z is not y).
    z = torch.empty_like(y) if store_preactivation else y
    # A split met first inside a CUDA-graph capture runs untimed there, and is timed at the next call.
    if new_plan and key is not None:
        if not _split_to_time(plan, split_k, a):
            _PLANS[key] = plan
        elif not torch.cuda.is_current_stream_capturing():
            one_slice = _make_plan(a, b, activation, 1, use_tma, input_precision)
            _PLANS[key] = plan = _timed_split(key, a2, b, y, z, plan, one_slice)
    if plan.path == "empty":
        y.zero_()  # an empty sum is 0, and every activation here maps 0 to 0
        z.zero_()
    else:
        _LAUNCHERS[plan.path](key, a2, b, y, z, plan)
    if a.dim() != 2:  # rows back to a's leading dims
        y, z = y.view(*a.shape[:-1], n), z.view(*a.shape[:-1], n)
    return y, z if store_preactivation else None


# ----------------------------------------------------------------------------------------------------
# 7. Autograd: the backward is two more GEMMs, on the same kernels
# ----------------------------------------------------------------------------------------------------
#
# dz = dy * act'(z);  da = dz @ b^T;  db = a^T @ dz. The transposes are views (strides swapped), which
# the portable kernel reads directly. The activation's derivative needs z, the pre-activation: with an
# activation and a gradient to compute, the forward also stores z (one extra M x N write, the same trade
# as cuBLASLt's "GELU_AUX" epilogue) rather than recomputing a whole GEMM in the backward. act'(z) is
# taken by PyTorch's autograd through the reference activation, so it cannot disagree with it.


class _Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, activation, split_k):  # type: ignore[override]
        needs_z = activation is not None and (a.requires_grad or b.requires_grad)
        y, z = matmul_forward(a, b, activation, split_k=split_k, store_preactivation=needs_z)
        ctx.save_for_backward(a, b, z)
        ctx.activation = activation
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        a, b, z = ctx.saved_tensors
        dz = dy
        if ctx.activation is not None:
            with torch.enable_grad():
                z32 = z.detach().float().requires_grad_()
                (dz,) = torch.autograd.grad(ACTIVATIONS[ctx.activation](z32), z32, dy.float())
            dz = dz.to(dy.dtype)
        dz2 = dz.reshape(-1, b.shape[1])
        a2 = a.reshape(-1, b.shape[0])
        da = matmul_forward(dz2, b.t())[0].view(a.shape) if ctx.needs_input_grad[0] else None
        db = matmul_forward(a2.t(), dz2)[0] if ctx.needs_input_grad[1] else None
        return da, db, None, None


def matmul(
    a: torch.Tensor, b: torch.Tensor, activation: str | None = None, *, split_k: int | None = None
) -> torch.Tensor:
    """act(a @ b) with the Triton kernels; differentiable in a and b.

    a: (..., M, K), b: (K, N), same dtype (fp32/fp16/bf16); returns (..., M, N) in that dtype.
    activation: None, "relu", "gelu_tanh" (GELU, tanh approximation) or "silu", fused into the epilogue.
    split_k: None chooses; see matmul_forward.
    """
    return _Matmul.apply(a, b, activation, split_k)


# ----------------------------------------------------------------------------------------------------
# 8. Benchmark: TFLOP/s against cuBLAS (torch.matmul)
# ----------------------------------------------------------------------------------------------------
#
# Square bf16 GEMMs from 1024 to 8192 (the goals: at least 0.95x cuBLAS at 4096 and 8192, where both are
# compute-bound, and 0.9x at 2048, where the host's launch cost starts to show), the portable kernel
# beside the TMA one at 4096 and 8192 to show what TMA buys, the fused gelu_tanh epilogue against cuBLAS
# followed by F.gelu (unfused), and decode-shaped skinny GEMMs (M = 1..64, N = 4096, K = 14336) where
# split-K matters, against cuBLAS (goal: 0.85x). Inputs are drawn once and each side writes a fresh output
# per call, as torch.matmul does.
#
# The decode sweep is a kernel of its own in `effdl bench kernels` (matmul_decode, its own JSON and plot):
# the weights of one Llama-3-8B-sized decoder layer (hidden 4096, MLP 14336; bf16) times M = 1..256 token
# rows. Ours, as matmul_forward chooses (the split is in the label: S=..., after the first call has timed
# the rule's split against split_k=1's plan), is timed in the same process against cuBLAS; against ours with
# split_k=1, which for M <= SMALL_M_MAX keeps the same small-M tiles, so that this comparison shows what
# splitting K alone buys; and, for M <= 16 on a Hopper GPU, against the tiled kernel that never splits K
# (the TMA kernel of large M, with its 64- to 256-row tiles, which split_k=1 ran at small M before the
# small-M path). The goals, for M <= 16: the small-M path (short tiles, split K) at least 1.2x that tiled
# kernel, and at least 0.9x cuBLAS.

# Timed eagerly, so the host's launch cost counts: at 2048³ cuBLAS's GEMM takes ~27 µs on an H200.
LARGE_GOAL = Goal("speedup", ">=", 0.95, ">= 0.95x cuBLAS")
MEDIUM_GOAL = Goal("speedup", ">=", 0.9, ">= 0.9x cuBLAS")
DECODE_GOAL = Goal("speedup", ">=", 0.85, ">= 0.85x cuBLAS")
# What one call costs the host (common.bench.host_time_us), measured on the host-bound sizes and the decode
# shapes, where our Python launch path, not the GPU, can decide the time.
HOST_GOAL = Goal("host_us", "<=", 20.0, "<= 20 µs of host time per call")
SPLIT_GOAL = Goal("speedup", ">=", 1.2, ">= 1.2x the tiled kernel")
# (K, N) of the decode sweep's weights: attention's output projection (q's is the same shape), the MLP's
# gate/up projection and its down projection.
DECODE_WEIGHTS = {"attn_o": (4096, 4096), "mlp_up": (4096, 14336), "mlp_down": (14336, 4096)}
DECODE_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DECODE_GOAL_MAX_M = 16  # the goals hold up to this many rows


def benchmark_cases(quick: bool = False) -> list[KernelCase]:
    """bf16 square GEMMs, fused activation and skinny split-K cases, then the decode sweep; GPU only."""
    device = require_gpu("matmul benchmark")
    dtype = torch.bfloat16
    cases: list[KernelCase] = []

    def inputs(m: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)

    for size in [1024, 4096] if quick else [1024, 2048, 4096, 8192]:
        a, b = inputs(size, size, size)
        goals = (LARGE_GOAL,) if size >= 4096 else (MEDIUM_GOAL, HOST_GOAL) if size == 2048 else (HOST_GOAL,)
        cases.append(
            KernelCase(
                kernel="matmul",
                label=f"{size}x{size}x{size} bf16",
                x=size,
                ours=lambda a=a, b=b: matmul_forward(a, b),
                baseline=lambda a=a, b=b: torch.matmul(a, b),
                baseline_name="cuBLAS (torch.matmul)",
                flops=2.0 * size**3,
                dtype=dtype,
                goals=goals,
                measure_host=size <= 2048,
            )
        )
        if size >= 4096:
            cases.append(
                KernelCase(
                    kernel="matmul",
                    label=f"portable {size}x{size}x{size} bf16",
                    x=size,
                    ours=lambda a=a, b=b: matmul_forward(a, b, use_tma=False),
                    baseline=lambda a=a, b=b: torch.matmul(a, b),
                    baseline_name="cuBLAS (torch.matmul)",
                    flops=2.0 * size**3,
                    dtype=dtype,
                )
            )
            cases.append(
                KernelCase(
                    kernel="matmul",
                    label=f"gelu_tanh {size}x{size}x{size} bf16",
                    x=size,
                    ours=lambda a=a, b=b: matmul_forward(a, b, "gelu_tanh"),
                    baseline=lambda a=a, b=b: matmul_reference(a, b, "gelu_tanh"),
                    baseline_name="torch.matmul + F.gelu",
                    flops=2.0 * size**3,
                    dtype=dtype,
                )
            )
    n, k = 4096, 14336
    for m in [16] if quick else [1, 16, 64]:
        a, b = inputs(m, n, k)
        _settled_plan(a, b)
        cases.append(
            KernelCase(
                kernel="matmul",
                label=f"decode {m}x{n}x{k} bf16",
                x=m,
                ours=lambda a=a, b=b: matmul_forward(a, b),
                baseline=lambda a=a, b=b: torch.matmul(a, b),
                baseline_name="cuBLAS (torch.matmul)",
                flops=2.0 * m * n * k,
                bytes=(m * k + k * n + m * n) * 2,
                dtype=dtype,
                goals=(DECODE_GOAL, HOST_GOAL),
                measure_host=True,
            )
        )
    return cases + decode_benchmark_cases(quick)


def _settled_plan(a: torch.Tensor, b: torch.Tensor) -> _Plan:
    """The plan matmul_forward(a, b) runs, settled by a first call (on a GPU, timing the split) before any
    benchmark times it."""
    matmul_forward(a, b)
    return _PLANS[_forward_key(a, b)]


def decode_benchmark_cases(quick: bool = False) -> list[KernelCase]:
    """The matmul_decode sweep: Llama weights times M = 1..256 rows, ours against cuBLAS, against ours
    with split_k=1, and (M <= 16, Hopper or newer) against the TMA kernel, which never splits K; GPU only."""
    device = require_gpu("matmul_decode benchmark")
    dtype = torch.bfloat16
    cases: list[KernelCase] = []
    for name, (k, n) in DECODE_WEIGHTS.items():
        w = torch.randn(k, n, device=device, dtype=dtype)
        for m in (1, 16, 256) if quick else DECODE_ROWS:
            a = torch.randn(m, k, device=device, dtype=dtype)
            splits = _settled_plan(a, w).splits
            goal_case = m <= DECODE_GOAL_MAX_M
            shared = {
                "kernel": "matmul_decode",
                "x": m,
                "ours": lambda a=a, w=w: matmul_forward(a, w)[0],
                "flops": 2.0 * m * n * k,
                "bytes": (m * k + k * n + m * n) * 2,
                "dtype": dtype,
            }
            cases.append(
                KernelCase(
                    label=f"{name} {k}x{n} M={m} S={splits} vs cuBLAS",
                    baseline=lambda a=a, w=w: torch.matmul(a, w),
                    baseline_name="cuBLAS (torch.matmul)",
                    goals=(MEDIUM_GOAL,) if goal_case else (),
                    **shared,
                )
            )
            cases.append(
                KernelCase(
                    label=f"{name} {k}x{n} M={m} S={splits} vs unsplit",
                    baseline=lambda a=a, w=w: matmul_forward(a, w, split_k=1)[0],
                    baseline_name="ours, split_k=1",
                    **shared,
                )
            )
            if goal_case and _tma_ok(a, w) is None:  # the tiled kernel's baseline is the TMA one (Hopper+)
                cases.append(
                    KernelCase(
                        label=f"{name} {k}x{n} M={m} S={splits} vs tiled",
                        baseline=lambda a=a, w=w: matmul_forward(a, w, use_tma=True)[0],
                        baseline_name="ours, tiled without split-K (TMA)",
                        goals=(SPLIT_GOAL,),
                        **shared,
                    )
                )
    return cases
