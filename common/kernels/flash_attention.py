"""Flash attention (FlashAttention-2 style): exact attention without the S x S matrix, forward and backward.

What you will learn: why naive attention is memory-bound and memory-hungry; how the online softmax lets a
program stream keys and values through on-chip memory and never write the score matrix; what the backward
recomputes instead of storing (everything but one log-sum-exp per query); how a causal mask becomes a
*saving* (blocks above the diagonal are skipped, only the diagonal ones are masked); and the choices that
make it fast on a Hopper GPU (block sizes, exp2, pipelining, the order of the programs).

For one head, with queries, keys and values Q, K, V of S rows of D numbers:

    scores = scale * Q K^T              [S, S]   (scale = 1/sqrt(D) by default)
    P = softmax(scores)                          (row-wise; causal: query i sees keys j <= i only)
    O = P V                             [S, D]

Naive attention writes `scores` and `P` to memory and reads them back: with B = 4 sequences, H = 16 heads
and S = 4096 in bf16, each is B H S^2 2 bytes = 2 GiB, against 64 MiB for each of Q, K, V and O. Its memory
traffic grows as S^2 and so does the memory autograd keeps for the backward (P, 2 GiB here). FlashAttention
computes O block by block: a program owns BLOCK_M queries and streams K and V in blocks of BLOCK_N through
shared memory, keeping the running softmax statistics in registers. The S x S matrix never leaves the chip:
traffic drops to reading Q once and K, V once per query block, and the backward keeps O and the log-sum-exp
of each query's scores (B H S fp32 numbers: 1 MiB) instead of P.

The price is recomputation: the backward computes the scores again (FLOPs are cheap, memory is not).

This file is the forward half of the lesson, and the public API: the reference, the tiles, the forward
kernel, the autograd function and flash_attention(), and the benchmark. The backward kernels, which the
autograd function calls, are the second half: flash_attention_backward.py.

Run the tests and the benchmark:

    pytest tests/kernels/test_flash_attention.py        # add -m gpu on a GPU machine
    effdl bench kernels --kernel flash_attention        # TFLOP/s against PyTorch's SDPA FLASH backend
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from common.kernels import INTERPRETED, check_input
from common.kernels.benchmark import Goal, KernelCase, require_gpu
from common.kernels.matmul import fp32_input_precision

__all__ = [
    "HEAD_DIMS",
    "attention_reference",
    "benchmark_cases",
    "flash_attention",
    "flash_attention_forward",
]

HEAD_DIMS = (64, 128)
LOG2E = math.log2(math.e)

# ----------------------------------------------------------------------------------------------------
# 1. The reference: attention as three matmul-sized steps, each a round trip to memory
# ----------------------------------------------------------------------------------------------------


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, scale: float | None = None
) -> torch.Tensor:
    """softmax(scale * q k^T, masked if causal) v for q, k, v [B, H, S, D], materialising the scores.

    Memory traffic per head, counted in elements of S x S: the matmul writes the scores (1), scaling reads
    and writes them (2), the causal mask another 2, softmax 2, the product with v reads P (1). That is 6-8 S^2
    against 4 S D to read Q, K, V and write O: 48-64x more at S = 4096, D = 128. Autograd keeps the
    [B, H, S, S] softmax for the backward. The tests run this in float64 as the ground truth.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = scale * (q @ k.transpose(-2, -1))  # [B, H, S, S]
    if causal:
        s = q.shape[-2]
        future = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


# ----------------------------------------------------------------------------------------------------
# 2. Tiles: block sizes, warps and pipeline depth, autotuned
# ----------------------------------------------------------------------------------------------------
#
# A program's tile must fit on one SM: its accumulators in registers (at most 255 per thread), its staged
# K and V blocks in shared memory (227 KiB on an H100), with num_stages copies of each in flight. For the
# forward with D = 128, BLOCK_M = 128 queries over 8 warps (two warpgroups of Hopper's wgmma) hold the fp32
# output accumulator in 64 registers per thread; BLOCK_N = 64 or 128 keys per step; 2-3 stages of K and V
# take 96-192 KiB, Q another 32 KiB. The backward (flash_attention_backward.py) holds two accumulators
# (dK and dV) per program, so its key blocks are streamed past smaller query steps (16-64). Each
# configuration below compiles for an H100 without register spills (checked with ptxas), and the autotuner
# times the three that fit the head dim on the first call for each sequence length and dtype, then reuses
# the winner.
#
# fp32 inputs follow the course's policy for fp32 dots (see matmul.py): like torch.matmul, they are exact
# fp32 (input_precision="ieee", on the CUDA cores) under PyTorch's default
# torch.set_float32_matmul_precision("highest"), and TF32 (inputs rounded to 10 mantissa bits, on the
# tensor cores) under "high" or "medium". fp32 attention here exists for checking against a reference, not
# for speed: one small 16 x 16 tile, whose operands fit in registers either way. fp16 and bf16 dots use
# tensor cores with fp32 accumulation, where input_precision plays no part.
#
# Under the interpreter there is one small tile: smaller than the test sequences, so that several blocks,
# the diagonal split and partial blocks all run.

# (BLOCK_M, BLOCK_N, num_warps, num_stages). In the forward and dQ kernels a program owns BLOCK_M queries
# and steps over keys BLOCK_N at a time; in the dK/dV kernel it owns BLOCK_N keys and steps over queries.
TILES: dict[str, dict[int | str, list[tuple[int, int, int, int]]]] = {
    "fwd": {
        64: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
        128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3)],
        "fp32": [(16, 16, 4, 2)],
        "interpreter": [(32, 16, 4, 1)],
    },
    "dkdv": {
        64: [(32, 128, 8, 3), (16, 128, 8, 3), (32, 64, 4, 3)],
        128: [(16, 128, 8, 3), (32, 128, 8, 3), (32, 64, 4, 3)],
        "fp32": [(16, 16, 4, 2)],
        "interpreter": [(16, 32, 4, 1)],
    },
    "dq": {
        64: [(128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3)],
        128: [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)],
        "fp32": [(16, 16, 4, 2)],
        "interpreter": [(32, 16, 4, 1)],
    },
}


def _config(tile: tuple[int, int, int, int]) -> triton.Config:
    block_m, block_n, num_warps, num_stages = tile
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


def _autotune(kernel: str):
    """triton.autotune over TILES[kernel]: all GPU tiles, pruned per call to those of the head dim/dtype."""
    if INTERPRETED:
        return triton.autotune([_config(t) for t in TILES[kernel]["interpreter"]], key=[])
    groups = {
        group: [_config(t) for t in tiles] for group, tiles in TILES[kernel].items() if group != "interpreter"
    }

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        group = "fp32" if named_args["q_ptr"].dtype == torch.float32 else {**named_args, **kwargs}["HEAD_DIM"]
        return groups[group]

    return triton.autotune(
        [c for cs in groups.values() for c in cs],
        key=["seq_len", "HEAD_DIM", "CAUSAL", "INPUT_PRECISION"],  # and the dtypes, added by the autotuner
        prune_configs_by={"early_config_prune": prune},
    )


# ----------------------------------------------------------------------------------------------------
# 3. Forward: one program per block of queries, keys and values streamed through
# ----------------------------------------------------------------------------------------------------
#
# Online softmax over key blocks (the same idea as the long-row softmax kernel): for each query row keep
# the running maximum m of its scores, the running sum l of exp(score - m) and the running output
# acc = sum exp(score - m) v. A new block of keys with larger scores raises m to m'; the old l and acc are
# rescaled by alpha = exp(m - m') and the block's terms are added. At the end O = acc / l, and the program
# saves lse = m + log(l) per query: all the backward needs to rebuild P = exp(score - lse) block by block.
#
# Details that matter for speed:
# - exp2 instead of exp: the GPU's exponential unit computes 2^x. exp(x) = 2^(x log2 e), so log2(e) is folded
#   into the scale once (qk_scale = scale * log2 e) and the kernel works in base 2 throughout; lse is stored
#   in base 2 too. The multiply by qk_scale and the subtraction of m fuse into one FMA per score.
# - Causal attention skips every block above the diagonal (half the work at large S) and splits the loop:
#   blocks fully below the diagonal run without any mask, and only the BLOCK_M / BLOCK_N blocks on it pay for
#   building and applying one. Likewise the last, partial block of a sequence whose length S is not a
#   multiple of BLOCK_N is the only one that checks bounds. MASKED is a constexpr, so each loop compiles to
#   its own code with no per-element branch.
# - The loop over keys is software-pipelined (num_stages): the loads of the next blocks of K and V are in
#   flight while tensor cores work on the current one.
# - The two matmuls take 16-bit inputs and accumulate in fp32; P is rounded to the input dtype for P V, as in
#   FlashAttention-2. The softmax statistics are fp32.
# - Causal programs start with the last query blocks, the ones with the most keys to visit, so the shortest
#   programs run at the end and fill the gaps (longest first is the classic schedule for load balance).


@triton.jit
def _fwd_key_blocks(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_ks,
    stride_vs,
    offs_m,
    offs_d,
    lo,
    hi,
    seq_len,
    qk_scale,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Fold the key blocks [lo, hi) into the running (acc, l, m) of one block of queries."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vs + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < seq_len, other=0.0)
        else:
            k = tl.load(k_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_N] raw scores, fp32
        if MASKED:
            keep = offs_n[None, :] < seq_len
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            s = tl.where(keep, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            s = s - m_new[:, None]
        else:
            m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
            s = s * qk_scale - m_new[:, None]
        # Every row has seen at least one unmasked key before a fully masked block can come (key 0 for a
        # causal row, blocks run left to right), so m_new is finite and no exp2(-inf + inf) = NaN arises.
        p = tl.math.exp2(s)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if MASKED:
            v = tl.load(v_ptrs, mask=offs_n[:, None] < seq_len, other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@_autotune("fwd")
@triton.jit
def _attn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    n_heads,
    seq_len,
    qk_scale,
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "the causal diagonal is split into whole key blocks")
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m  # longest programs first
    pid_bh = tl.program_id(1)
    batch = (pid_bh // n_heads).to(tl.int64)
    head = (pid_bh % n_heads).to(tl.int64)
    q_base = q_ptr + batch * stride_qb + head * stride_qh
    k_base = k_ptr + batch * stride_kb + head * stride_kh
    v_base = v_ptr + batch * stride_vb + head * stride_vh

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=offs_m[:, None] < seq_len, other=0.0
    )

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if CAUSAL:
        # Keys [0, start_m) are visible to every query of the block: no mask. Keys [start_m, start_m +
        # BLOCK_M) straddle the diagonal: masked. Keys beyond are in the future of every query: skipped.
        acc, l_i, m_i = _fwd_key_blocks(
            acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
            0, start_m, seq_len, qk_scale, False, True, BLOCK_N, INPUT_PRECISION,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_key_blocks(
            acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
            start_m, tl.minimum(start_m + BLOCK_M, seq_len), seq_len, qk_scale, True, True, BLOCK_N,
            INPUT_PRECISION,
        )  # fmt: skip
    else:
        # Whole key blocks without a mask, then the partial last block (if S % BLOCK_N != 0) with one.
        n_full = (seq_len // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fwd_key_blocks(
            acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
            0, n_full, seq_len, qk_scale, False, False, BLOCK_N, INPUT_PRECISION,
        )  # fmt: skip
        acc, l_i, m_i = _fwd_key_blocks(
            acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
            n_full, seq_len, seq_len, qk_scale, True, False, BLOCK_N, INPUT_PRECISION,
        )  # fmt: skip

    # O and LSE are ours, contiguous: [B, H, S, D] and [B, H, S].
    rows = pid_bh.to(tl.int64) * seq_len + offs_m
    tl.store(
        o_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :],
        (acc / l_i[:, None]).to(o_ptr.dtype.element_ty),
        mask=offs_m[:, None] < seq_len,
    )
    tl.store(lse_ptr + rows, m_i + tl.math.log2(l_i), mask=offs_m < seq_len)


# ----------------------------------------------------------------------------------------------------
# 4. Launching, autograd and the public function
# ----------------------------------------------------------------------------------------------------
#
# q, k and v may be any [B, H, S, D] views whose last dim is contiguous, e.g. a [B, S, H, D] projection
# transposed to [B, H, S, D]: their strides go to the kernels, so nothing is copied. O and the log-sum-exp
# are allocated contiguous (and so are the gradients, in flash_attention_backward.py).


def _input_precision(dtype: torch.dtype) -> str:
    # For fp16/bf16 inputs input_precision is ignored; pass the one value so they compile to one kernel.
    return fp32_input_precision() if dtype == torch.float32 else "ieee"


def _attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """O [B, H, S, D] and the base-2 log-sum-exp of the scaled scores [B, H, S] (fp32)."""
    batch, heads, seq_len, head_dim = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq_len), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    _attn_fwd_kernel[lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * heads)](
        q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], heads, seq_len, scale * LOG2E,
        CAUSAL=causal, HEAD_DIM=head_dim, INPUT_PRECISION=_input_precision(q.dtype),
    )  # fmt: skip
    return o, lse


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        o, lse = _attention_forward(q, k, v, causal, scale)
        # What the backward needs beyond the inputs: O and one number per query. Not P (S x S per head).
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        # Imported on the first backward, not at the top: the backward kernels use this file's tiles.
        from common.kernels.flash_attention_backward import attention_backward

        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(do, q, k, v, o, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> float:
    """Raise a clear error unless q, k, v are inputs the kernels take; return the scale to use."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_input(x, name)
        if x.dim() != 4:
            raise ValueError(
                f"{name} must be [B, H, S, D] (batch, heads, sequence, head dim), got {tuple(x.shape)}; "
                f"a [B, S, H, D] projection becomes one with {name}.transpose(1, 2) (no copy)"
            )
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"q, k and v must have one shape [B, H, S, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}; self-attention only (no cross-attention lengths, no grouped-query heads: "
            "repeat k and v along the heads first)"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    head_dim = q.shape[-1]
    if head_dim not in HEAD_DIMS:
        raise ValueError(
            f"head dim D = {head_dim} is not supported: the kernels are tuned for D in {HEAD_DIMS}; "
            "use torch.nn.functional.scaled_dot_product_attention for other head sizes"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1:
            raise ValueError(
                f"{name} has stride {x.stride(-1)} along its head dim; the kernels read each row of D "
                f"numbers contiguously: pass {name}.contiguous()"
            )
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number (or None for 1/sqrt(D)), got {scale!r}")
    return float(scale)


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, scale: float | None = None
) -> torch.Tensor:
    """Exact attention softmax(scale q k^T) v with the FlashAttention-2 kernels; differentiable.

    q, k, v: [B, H, S, D] with D in (64, 128), one dtype (fp16, bf16; fp32 for checking), last dim
    contiguous. causal: query i attends to keys j <= i. scale: default 1/sqrt(D). Returns O [B, H, S, D],
    contiguous. Like F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale).
    """
    scale = _check_qkv(q, k, v, scale)
    return _FlashAttention.apply(q, k, v, bool(causal), scale)


def flash_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """O and the natural-log log-sum-exp of each query's scaled scores [B, H, S] (fp32); no autograd.

    The log-sum-exp is what the backward saves; it also lets attention over separate blocks of keys be
    merged exactly (as in ring attention): O = sum_b exp(lse_b - lse) O_b with lse = logsumexp_b lse_b.
    """
    scale = _check_qkv(q, k, v, scale)
    o, lse2 = _attention_forward(q, k, v, bool(causal), scale)
    return o, lse2 / LOG2E


# ----------------------------------------------------------------------------------------------------
# 5. Benchmark: forward and backward against PyTorch's SDPA with its FLASH backend (FlashAttention-2)
# ----------------------------------------------------------------------------------------------------
#
# Sizes as in FlashAttention's own benchmarks: 16k tokens per batch (B = 16384 / S), model width 2048
# (H = 2048 / D heads), bf16. FLOPs: 4 B H S^2 D for the forward (two matmuls), halved when causal, and 2.5x
# that for the backward. The goals, on H100 for D = 128, causal, S = 4096: forward at least as fast as
# SDPA FLASH, backward at least 0.7x (ours recomputes more, see flash_attention_backward.py).
#
# What each closure times:
# - forward: one call on inputs that don't require grad (no autograd graph), for both sides.
# - backward: only the backward. The forward runs once when the cases are built, with requires_grad inputs;
#   the closure calls torch.autograd.grad(o, (q, k, v), do, retain_graph=True) on that graph, which runs
#   the saved backward and allocates the three gradients. Ours: the delta kernel, then the dK/dV and the dQ
#   kernels. SDPA's: its FLASH backward, chosen when the graph was built under sdpa_kernel(FLASH_ATTENTION).

FWD_GOAL = Goal("speedup", ">=", 1.0, ">= 1.0x SDPA FLASH (forward)")
BWD_GOAL = Goal("speedup", ">=", 0.7, ">= 0.7x SDPA FLASH (backward)")


def _sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if FLASH can't run these inputs: no fallback
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def benchmark_cases(quick: bool = False) -> list[KernelCase]:
    """Forward and backward cases (bf16) over S for D = 128 causal, plus D = 64 and non-causal at S = 4096."""
    device = require_gpu("flash_attention benchmark")
    tokens, width = (4096, 1024) if quick else (16384, 2048)
    if quick:  # two sizes of one specialisation: a line in the plot, each tile compiled once
        shapes = [(1024, 128, True), (2048, 128, True)]
    else:
        shapes = [(s, 128, True) for s in (1024, 2048, 4096, 8192)] + [(4096, 128, False), (4096, 64, True)]
    generator = torch.Generator(device=device).manual_seed(0)
    cases = []
    for seq_len, head_dim, causal in shapes:
        shape = (max(1, tokens // seq_len), width // head_dim, seq_len, head_dim)
        q, k, v, do = (
            torch.randn(shape, device=device, dtype=torch.bfloat16, generator=generator) for _ in range(4)
        )
        fwd_flops = 4 * shape[0] * shape[1] * seq_len**2 * head_dim * (0.5 if causal else 1.0)
        name = f"{'causal' if causal else 'full'} hd{head_dim} S={seq_len} bf16"
        headline = not quick and (seq_len, head_dim, causal) == (4096, 128, True)
        cases.append(
            KernelCase(
                kernel="flash_attention",
                label=f"fwd {name}",
                x=seq_len,
                ours=lambda q=q, k=k, v=v, c=causal: flash_attention(q, k, v, causal=c),
                baseline=lambda q=q, k=k, v=v, c=causal: _sdpa_flash(q, k, v, c),
                baseline_name="SDPA FLASH",
                flops=fwd_flops,
                dtype=torch.bfloat16,
                goals=(FWD_GOAL,) if headline else (),
            )
        )
        ours_in = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        base_in = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        ours_out = flash_attention(*ours_in, causal=causal)
        base_out = _sdpa_flash(*base_in, causal)
        # One backward now: the autotuner times its tiles on the first call for this shape, and that (with
        # its own buffers) should not land in the runner's warm-up and peak-memory measurement.
        torch.autograd.grad(ours_out, ours_in, do, retain_graph=True)
        cases.append(
            KernelCase(
                kernel="flash_attention",
                label=f"bwd {name}",
                x=seq_len,
                ours=lambda o=ours_out, i=ours_in, do=do: torch.autograd.grad(o, i, do, retain_graph=True),
                baseline=lambda o=base_out, i=base_in, do=do: torch.autograd.grad(
                    o, i, do, retain_graph=True
                ),
                baseline_name="SDPA FLASH",
                flops=2.5 * fwd_flops,
                dtype=torch.bfloat16,
                goals=(BWD_GOAL,) if headline else (),
            )
        )
    return cases
