"""Flash attention, backward: dQ, dK and dV from the saved log-sum-exp, recomputing P block by block.

The second half of flash_attention.py, which holds the forward kernel, the PyTorch reference, the tiles both
halves are autotuned over, and the autograd function whose backward calls attention_backward() below.

What you will learn: what the backward recomputes instead of storing (everything but one log-sum-exp per
query); the one number per query (delta) that lets each gradient be computed block by block; how two
kernels, one owning keys and one owning queries, keep every sum inside one program without atomics, and
what that costs in FLOPs; how the causal diagonal and partial blocks are masked, as in the forward.

    pytest tests/kernels/test_flash_attention.py        # dQ, dK, dV against attention in float64
    effdl bench kernels --kernel flash_attention        # the backward against PyTorch's SDPA FLASH backend
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from common.kernels import INTERPRETED
from common.kernels.flash_attention import LOG2E, _autotune, _input_precision

__all__ = ["attention_backward"]

# ----------------------------------------------------------------------------------------------------
# 1. The gradients: recompute P block by block, FlashAttention-2 style
# ----------------------------------------------------------------------------------------------------
#
# With P = exp2(qk_scale * Q K^T - lse) rebuilt from the saved lse, the gradients are
#
#     dV = P^T dO,     dP = dO V^T,     dS = P * (dP - delta),     dQ = scale dS K,     dK = scale dS^T Q,
#
# where delta_i = sum_j P_ij dP_ij = sum_d dO_id O_id: one number per query, computed first by a small
# kernel (the "preprocessing" of FlashAttention-2). Written as the left sum it would need a whole row of P
# and dP before the first element of dS; the right sum needs only O and dO, which are at hand.
#
# dK and dV sum over queries, dQ over keys. Two kernels keep every sum inside one program, with no atomics:
# - dK/dV: a program owns BLOCK_N keys (their k, v, dk, dv stay on chip) and streams the queries past them.
#   Causal: only queries i >= its first key matter, and only the first BLOCK_N of those need the mask.
# - dQ: a program owns BLOCK_M queries and streams the keys, like the forward. Causal: keys j <= i only.
# Counting matmuls per (query block, key block) pair: the forward does 2; the backward does 4 in the dK/dV
# kernel (S, dV, dP, dK) and 3 in the dQ kernel (S and dP again, then dQ). FlashAttention-2 does 5, adding
# each pair's share of dQ into fp32 memory with atomics instead of recomputing S and dP. Separate kernels
# cost 40% more FLOPs but are deterministic (atomics add in a different order on every run) and simpler.
# Throughput is reported, as is customary, for 5 (2.5x the forward's FLOPs). dS is rounded to the input
# dtype for its matmuls, as P is; everything is accumulated in fp32.


@triton.jit
def _bwd_preprocess_kernel(o_ptr, do_ptr, delta_ptr, seq_len, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.program_id(1).to(tl.int64) * seq_len + offs_m
    offs_d = tl.arange(0, HEAD_DIM)
    ptrs = rows[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(o_ptr + ptrs, mask=offs_m[:, None] < seq_len, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + ptrs, mask=offs_m[:, None] < seq_len, other=0.0).to(tl.float32)
    tl.store(delta_ptr + rows, tl.sum(o * do, axis=1), mask=offs_m < seq_len)


@triton.jit
def _dkdv_query_blocks(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qs,
    offs_n,
    offs_d,
    lo,
    hi,
    seq_len,
    qk_scale,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Add the query blocks [lo, hi) to dk, dv of one block of keys, on transposed [keys, queries] tiles."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ptrs = q_base + offs_m[:, None] * stride_qs + offs_d[None, :]
        do_ptrs = do_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        if MASKED:
            in_seq = offs_m < seq_len
            q = tl.load(q_ptrs, mask=in_seq[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=in_seq[:, None], other=0.0)
            lse = tl.load(lse_base + offs_m, mask=in_seq, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=in_seq, other=0.0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        s_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)  # [BLOCK_N, BLOCK_M]
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
        if MASKED:
            keep = in_seq[None, :]
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            p_t = tl.where(keep, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
    return dk, dv


@_autotune("dkdv")
@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    dk_ptr,
    dv_ptr,
    lse_ptr,
    delta_ptr,
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
    sm_scale,
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tl.static_assert(BLOCK_N % BLOCK_M == 0, "the causal diagonal is split into whole query blocks")
    pid_bh = tl.program_id(1)
    batch = (pid_bh // n_heads).to(tl.int64)
    head = (pid_bh % n_heads).to(tl.int64)
    q_base = q_ptr + batch * stride_qb + head * stride_qh
    rows0 = pid_bh.to(tl.int64) * seq_len  # first row of this head in the contiguous dO, dK, dV, LSE, delta
    do_base = do_ptr + rows0 * HEAD_DIM
    lse_base = lse_ptr + rows0
    delta_base = delta_ptr + rows0

    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_seq = offs_n[:, None] < seq_len
    k = tl.load(
        k_ptr + batch * stride_kb + head * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
        mask=in_seq,
        other=0.0,
    )
    v = tl.load(
        v_ptr + batch * stride_vb + head * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
        mask=in_seq,
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    n_full = (seq_len // BLOCK_M) * BLOCK_M
    if CAUSAL:
        # Queries [start_n, start_n + BLOCK_N) straddle the diagonal: masked. Later ones see every key of
        # the block: no mask, up to the partial last query block. Earlier ones see none: skipped.
        diag_end = start_n + BLOCK_N
        dk, dv = _dkdv_query_blocks(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, offs_n, offs_d,
            start_n, tl.minimum(diag_end, seq_len), seq_len, qk_scale, True, True, BLOCK_M, HEAD_DIM,
            INPUT_PRECISION,
        )  # fmt: skip
        dk, dv = _dkdv_query_blocks(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, offs_n, offs_d,
            diag_end, n_full, seq_len, qk_scale, False, True, BLOCK_M, HEAD_DIM, INPUT_PRECISION,
        )  # fmt: skip
        dk, dv = _dkdv_query_blocks(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, offs_n, offs_d,
            tl.maximum(n_full, diag_end), seq_len, seq_len, qk_scale, True, True, BLOCK_M, HEAD_DIM,
            INPUT_PRECISION,
        )  # fmt: skip
    else:
        dk, dv = _dkdv_query_blocks(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, offs_n, offs_d,
            0, n_full, seq_len, qk_scale, False, False, BLOCK_M, HEAD_DIM, INPUT_PRECISION,
        )  # fmt: skip
        dk, dv = _dkdv_query_blocks(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, offs_n, offs_d,
            n_full, seq_len, seq_len, qk_scale, True, False, BLOCK_M, HEAD_DIM, INPUT_PRECISION,
        )  # fmt: skip

    out = (rows0 + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dk_ptr + out, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=in_seq)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=in_seq)


@triton.jit
def _dq_key_blocks(
    dq,
    q,
    do,
    lse,
    delta,
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
    """Add the key blocks [lo, hi) to dq of one block of queries."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vs + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < seq_len, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < seq_len, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_N]
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            keep = offs_n[None, :] < seq_len
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    return dq


@_autotune("dq")
@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    dq_ptr,
    lse_ptr,
    delta_ptr,
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
    sm_scale,
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
    k_base = k_ptr + batch * stride_kb + head * stride_kh
    v_base = v_ptr + batch * stride_vb + head * stride_vh
    rows0 = pid_bh.to(tl.int64) * seq_len

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_seq = offs_m < seq_len
    q = tl.load(
        q_ptr + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
        mask=in_seq[:, None],
        other=0.0,
    )
    do = tl.load(
        do_ptr + (rows0 + offs_m)[:, None] * HEAD_DIM + offs_d[None, :], mask=in_seq[:, None], other=0.0
    )
    lse = tl.load(lse_ptr + rows0 + offs_m, mask=in_seq, other=0.0)
    delta = tl.load(delta_ptr + rows0 + offs_m, mask=in_seq, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    if CAUSAL:
        dq = _dq_key_blocks(
            dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
            0, start_m, seq_len, qk_scale, False, True, BLOCK_N, INPUT_PRECISION,
        )  # fmt: skip
        dq = _dq_key_blocks(
            dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
            start_m, tl.minimum(start_m + BLOCK_M, seq_len), seq_len, qk_scale, True, True, BLOCK_N,
            INPUT_PRECISION,
        )  # fmt: skip
    else:
        n_full = (seq_len // BLOCK_N) * BLOCK_N
        dq = _dq_key_blocks(
            dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
            0, n_full, seq_len, qk_scale, False, False, BLOCK_N, INPUT_PRECISION,
        )  # fmt: skip
        dq = _dq_key_blocks(
            dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d,
            n_full, seq_len, seq_len, qk_scale, True, False, BLOCK_N, INPUT_PRECISION,
        )  # fmt: skip
    tl.store(
        dq_ptr + (rows0 + offs_m)[:, None] * HEAD_DIM + offs_d[None, :],
        (dq * sm_scale).to(dq_ptr.dtype.element_ty),
        mask=in_seq[:, None],
    )


# ----------------------------------------------------------------------------------------------------
# 2. Launching
# ----------------------------------------------------------------------------------------------------
#
# q, k and v keep their strides, which go to the kernels, as in the forward; the gradients are allocated
# contiguous, like O and the log-sum-exp, and dO is made contiguous (a copy only if autograd hands over
# another layout).

# Queries per program of the delta kernel: a plain row reduction, memory-bound, no tuning needed.
PREPROCESS_BLOCK_M = 32 if INTERPRETED else 64


def attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV for upstream gradient dO, from the inputs, the output and the saved log-sum-exp."""
    batch, heads, seq_len, head_dim = q.shape
    do = do.contiguous()
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    if q.numel() == 0:
        return dq, dk, dv
    delta = torch.empty_like(lse)
    _bwd_preprocess_kernel[(triton.cdiv(seq_len, PREPROCESS_BLOCK_M), batch * heads)](
        o, do, delta, seq_len, HEAD_DIM=head_dim, BLOCK_M=PREPROCESS_BLOCK_M
    )
    args = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], heads, seq_len, scale * LOG2E, scale)
    meta = {"CAUSAL": causal, "HEAD_DIM": head_dim, "INPUT_PRECISION": _input_precision(q.dtype)}
    _attn_bwd_dkdv_kernel[lambda m: (triton.cdiv(seq_len, m["BLOCK_N"]), batch * heads)](
        q, k, v, do, dk, dv, lse, delta, *args, **meta
    )
    _attn_bwd_dq_kernel[lambda m: (triton.cdiv(seq_len, m["BLOCK_M"]), batch * heads)](
        q, k, v, do, dq, lse, delta, *args, **meta
    )
    return dq, dk, dv
