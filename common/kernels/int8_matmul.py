"""Weight-only int8 matmul for decoding: y = (x @ q^T) * scale, reading one byte per weight.

What you will learn: why decoding one sequence is a stream of the weights, how a kernel that converts
int8 to float as it loads halves that stream, and how to register a Triton kernel as a PyTorch operator
so that torch.compile and CUDA graphs take it as one opaque call.

A decode step multiplies a few token rows x (M x K, M = the batch, often 1) by every weight of the model.
With M = 1 that is 2K FLOPs per output and K weights to read: about one FLOP per byte in bf16, far left of
any GPU's ridge point, so the time is the time to read the weights. Stored as int8 with one float scale
per output row (common.inference.quantization.quantize_int8: w ~ q * s), the weight is half the bytes of
bf16, and since the scale is per output row it comes out of the sum:

    y[m, n] = sum_k x[m, k] * q[n, k] * s[n] = s[n] * sum_k x[m, k] * q[n, k]

so the kernel multiplies by integers converted in registers and scales each output once at the end. What
must never happen is a dequantized copy in memory: eager `F.linear(x, q.to(x.dtype)) * s` writes one (read
1 byte, write 2, read 2 again), 2.5 times the traffic of a plain bf16 matmul.

The kernel is a reduction over K, shaped as Inductor shapes one: each program owns BLOCK_N output
columns (rows of q, each contiguous in memory) of one token row, and walks K in chunks of BLOCK_K: it
loads a BLOCK_N x BLOCK_K tile of q (BLOCK_K contiguous bytes per row, coalesced) and the matching chunk
of x, and adds their products into a BLOCK_N x BLOCK_K tile of fp32 partial sums. The reduction over K
happens once, after the loop, instead of once per chunk: inside the loop each thread converts,
multiplies and adds what it loaded. x's chunk is loaded as a (1, BLOCK_K) row and broadcast over q's
rows. The broadcast is not free: Triton gives each load its own register layout, as wide as one 16-byte
access allows (16 int8 values of q per thread, 8 bf16 values of x), so the compiled loop passes x's chunk
through shared memory to q's layout, with barriers, every iteration (the sm_90 assembly shows it). In a
probe (not a committed benchmark), a variant without the barriers, whose every row of the tile loads x
itself in q's layout, was no faster on an H100 at one row (even on most of Llama-3-8B's weights, a
quarter slower on 4096 x 4096) and took up to 38% longer at two: the extra loads cost more than the wait.

More token rows (a batch decoding together) get more programs, not bigger ones: the token row is the
fastest axis of the grid, so the programs that read one block of q run side by side and can share it
through L2 rather than each bringing it from DRAM. Written out, the kernel does not depend on what a
compiler fuses around it (inside a whole model, Inductor fuses the preceding norm or activation into
such reductions, and each program then recomputes it).

No tensor cores: at a few rows they would multiply mostly padding (tl.dot needs 16 rows), and the
arithmetic is not the bottleneck. The price of this shape is that each token row streams q again (from
L2 at best), so the time grows with the rows: the benchmark below measures where it stops paying, and
common.inference.quantization.Int8WeightLinear sends only that many rows here; a prefill dequantizes and
uses a regular matmul, where the weight's bytes matter less next to the work.

    y = int8_weight_matmul(x, q, scale)   # x (..., K) float; q (N, K) int8; scale (N,); y (..., N), x's dtype
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from common.inference.quantization import int8_weight_matmul_reference, quantize_int8
from common.kernels import INTERPRETED, check_input
from common.kernels.benchmark import Goal, KernelCase, require_gpu
from common.kernels.launch import LaunchCache

__all__ = ["benchmark_cases", "int8_weight_matmul", "int8_weight_matmul_reference"]

# A program's tile is 1 to 4 KB of int8 per step. Streaming a weight at DRAM speed needs tens of KB in
# flight per SM (Little's law: ~3 TB/s x ~1 us over 132 SMs is ~23 KB), which small tiles reach through
# many resident programs per SM (each needs 8 to 64 registers of partial sums per thread). The configs
# trade columns per program (fewer programs, each re-reading less of x) against chunk length (longer
# contiguous runs of each row of q), and try software pipelining of the loads (3 stages) against none;
# the tuner picks per (M, N, K). On an H100, 2-warp programs won most shapes.
TILES = [(1, 1024), (2, 512), (4, 512), (4, 1024), (8, 256), (8, 512), (16, 128), (16, 256)]
NUM_WARPS = (2, 4)
NUM_STAGES = (1, 3)


INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 8, "BLOCK_K": 32}, num_warps=4, num_stages=1)  # small: fast


def tuned_configs() -> list[triton.Config]:
    """Every (tile, warps, stages) triple the autotuner tries on a GPU."""
    return [
        triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages)
        for block_n, block_k in TILES
        for warps in NUM_WARPS
        for stages in NUM_STAGES
    ]


@triton.jit
def _int8_to_float(q):
    """q (int8) as fp32 values, exactly, without a conversion instruction. The float with bits
    0x4B400000 is 1.5 * 2**23, whose last mantissa bit is worth 1: adding q to those bits gives the float
    1.5 * 2**23 + q, and a float subtraction leaves q. The int-to-float conversion instruction has a
    fraction of the throughput of integer adds and float subtractions (the CUDA programming guide's
    instruction-throughput table), and at one weight per byte it can be what limits the stream."""
    return (q.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.autotune(
    configs=[INTERPRETER_CONFIG] if INTERPRETED else tuned_configs(),
    key=["M", "N", "K"],
)
@triton.jit
def _int8_weight_matmul_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_ym,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    row, pid_n = pid % M, pid // M  # token rows fastest: the programs sharing a block of q run together
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    x_ptrs = x_ptr + row * stride_xm + offs_k[None, :]  # (1, BLOCK_K): broadcasts over q's rows
    q_ptrs = q_ptr + offs_n[:, None].to(tl.int64) * stride_qn + offs_k[None, :]  # (BLOCK_N, BLOCK_K)
    partial = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_mask = offs_k[None, :] < K - k_start
        x = tl.load(x_ptrs, mask=k_mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        q = tl.load(q_ptrs, mask=n_mask[:, None] & k_mask, other=0)
        partial += x * _int8_to_float(q)  # multiply-add only: no reduction inside the loop
        x_ptrs += BLOCK_K
        q_ptrs += BLOCK_K
    acc = tl.sum(partial, axis=1)  # (BLOCK_N,): the one reduction over K
    scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    y = (acc * scale).to(y_ptr.dtype.element_ty)  # one rounding, to x's dtype
    tl.store(y_ptr + row * stride_ym + offs_n, y, mask=n_mask)


_LAUNCHES = LaunchCache(_int8_weight_matmul_kernel)


def _check(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    check_input(x, "x")
    check_input(q, "q", dtypes=(torch.int8,))
    check_input(scale, "scale")
    if q.dim() != 2 or q.stride(-1) != 1:
        raise ValueError(
            f"q must be a 2-D (N, K) int8 weight with contiguous rows, got shape {tuple(q.shape)} and strides "
            f"{q.stride()}: pass the quantized weight as stored, (out_features, in_features)"
        )
    n, k = q.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x's last dim must be q's K = {k}, got x of shape {tuple(x.shape)}")
    if scale.shape != (n,):
        raise ValueError(f"scale must have shape ({n},), one per row of q, got {tuple(scale.shape)}")
    if not (x.device == q.device == scale.device):
        raise ValueError(f"x, q and scale must be on one device, got {x.device}, {q.device}, {scale.device}")


@torch.library.custom_op("effdl::int8_weight_matmul", mutates_args=())
def int8_weight_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(x @ q^T) * scale with q read as int8, for the few rows of x of a decode step; y has x's dtype.

    A PyTorch operator (torch.library.custom_op), so torch.compile(fullgraph=True) keeps it as one call
    and a CUDA graph captures its launch.
    """
    _check(x, q, scale)
    n, k = q.shape
    x2 = x.reshape(-1, k).contiguous()
    y = x2.new_empty((x2.shape[0], n))
    if y.numel():
        _LAUNCHES.launch_auto(
            lambda meta: (x2.shape[0] * triton.cdiv(n, meta["BLOCK_N"]),),
            x2, q, scale, y, x2.shape[0], n, k, x2.stride(0), q.stride(0), y.stride(0),
        )  # fmt: skip
    return y.view(*x.shape[:-1], n)


@int8_weight_matmul.register_fake
def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Shape and dtype of the result, for torch.compile's tracing (no kernel runs)."""
    return x.new_empty((*x.shape[:-1], q.shape[0]))


# ----------------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------------
#
# The weights of one Llama-3-8B layer (N x K, as nn.Linear stores them) times M = 1, 2, 4 and 8 token rows,
# against the same weights in bf16 through cuBLAS: what quantizing buys one matmul of a decode step. The
# int8 side reads 1 byte per weight and bf16 2, so 2x is the bound where both stream at the same bandwidth;
# at M = 1 the goal is the course's bar for a whole decode step, 1.5x, which the matmuls must beat for the
# step to reach it. The copy-bandwidth column says how close each side comes to streaming at DRAM speed, and
# the larger M show where another pass over the weight per row stops paying (MAX_DECODE_ROWS).

DECODE_WEIGHTS = {"attention out": (4096, 4096), "MLP up": (14336, 4096), "MLP down": (4096, 14336)}
SPEEDUP_GOAL = Goal("speedup", ">=", 1.5, ">= 1.5x bf16 cuBLAS")


def benchmark_cases(quick: bool = False) -> list[KernelCase]:
    """Decode-shaped products with Llama-3-8B weights, int8 against bf16 cuBLAS (F.linear); GPU only."""
    device = require_gpu("int8_matmul benchmark")
    generator = torch.Generator(device=device).manual_seed(0)
    cases: list[KernelCase] = []
    for name, (n, k) in DECODE_WEIGHTS.items():
        weight = torch.randn(n, k, device=device, generator=generator).to(torch.bfloat16)
        q, scale = quantize_int8(weight, dim=-1)
        scale = scale.squeeze(1).to(torch.bfloat16)
        for m in (1,) if quick else (1, 2, 4, 8):
            x = torch.randn(m, k, device=device, generator=generator).to(torch.bfloat16)
            cases.append(
                KernelCase(
                    kernel="int8_matmul",
                    label=f"{name} {n}x{k} M={m} bf16",
                    x=m,
                    ours=lambda x=x, q=q, scale=scale: int8_weight_matmul(x, q, scale),
                    baseline=lambda x=x, weight=weight: F.linear(x, weight),
                    baseline_name="cuBLAS bf16 (F.linear)",
                    flops=2.0 * m * n * k,
                    bytes=n * k + 2 * n + 2 * m * k + 2 * m * n,  # int8 weight, bf16 scales, x and y
                    dtype=torch.bfloat16,
                    goals=(SPEEDUP_GOAL,) if m == 1 else (),
                    measure_host=m == 1,
                )
            )
    return cases
