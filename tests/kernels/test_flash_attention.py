"""Flash attention: O, dQ, dK, dV against attention in float64, on awkward shapes; input checks.

On CPU the kernels run in Triton's interpreter with its one tile (32 queries x 16 keys, 16 x 32 in the dK/dV
kernel), so the sequence lengths below cover several blocks, the causal diagonal split, partial last
blocks (37, 100) and whole ones (48). On a GPU (`-m gpu`): compiled and autotuned kernels, bf16 and fp16,
head dims 64 and 128, held to the accuracy of PyTorch's own FlashAttention-2 (SDPA's FLASH backend).
"""

from __future__ import annotations

import math

import pytest
import torch

from common.kernels import INTERPRETED
from common.kernels.flash_attention import (
    attention_reference,
    flash_attention,
    flash_attention_forward,
)

# Triton's interpreter converts 1-element numpy arrays to int, which numpy >= 1.25 flags as deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(shape, dtype, device=DEVICE, transposed=False):
    """q, k, v (requiring grad) and an upstream gradient dO, all [B, H, S, D].

    transposed: make q, k, v [B, S, H, D] tensors viewed as [B, H, S, D], as a model's projections are.
    """
    g = torch.Generator().manual_seed(0)
    b, h, s, d = shape
    tensors = [torch.randn((b, s, h, d) if transposed else shape, generator=g) for _ in range(4)]
    q, k, v, do = (t.to(device, dtype) for t in tensors)
    if transposed:
        q, k, v, do = (t.transpose(1, 2) for t in (q, k, v, do))
    return q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True), do


def _float64_reference(q, k, v, do, causal, scale=None):
    """O, dQ, dK, dV of naive attention in float64: the ground truth."""
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    o = attention_reference(q64, k64, v64, causal=causal, scale=scale)
    return (o.detach(), *torch.autograd.grad(o, (q64, k64, v64), do.double()))


def _max_rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error relative to the largest reference magnitude, or to 1 if that is smaller.

    The inputs are standard normal, so the outputs are of order 1 unless they cancel out: dQ with a single
    key is zero in exact arithmetic, and rounding leaves ~1e-6 of it, an error relative to the terms that
    cancelled (of order 1), not to the zero.
    """
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


# Tolerances relative to each tensor's largest magnitude. fp32: fp32 dots and softmax (eps 1.2e-7) over at
# most 100 keys: 1e-5 is a wide margin. fp16: P and dS are rounded to fp16 (eps 9.8e-4) before their
# matmuls, as in FlashAttention-2, and the outputs once more: errors of a few 1e-4 seen, 3e-3 allowed.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3}


@pytest.mark.parametrize(
    ("dtype", "shape", "causal"),
    [
        (torch.float32, (2, 2, 37, 64), True),
        (torch.float32, (1, 1, 100, 64), False),
        (torch.float32, (1, 2, 1, 128), True),
        (torch.float16, (1, 2, 48, 128), True),
        (torch.float16, (2, 1, 37, 64), False),
    ],
    ids=["fp32-S37-causal", "fp32-S100", "fp32-S1-causal", "fp16-S48-hd128-causal", "fp16-S37"],
)
def test_forward_and_backward_match_float64(dtype, shape, causal) -> None:
    q, k, v, do = _inputs(shape, dtype)
    o = flash_attention(q, k, v, causal=causal)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    ref = _float64_reference(q, k, v, do, causal)
    assert o.shape == shape and o.dtype == dtype
    for name, ours, expected in zip(("O", "dQ", "dK", "dV"), (o, dq, dk, dv), ref, strict=True):
        assert ours.dtype == dtype, name
        err = _max_rel_err(ours, expected)
        assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e}"


def test_strided_inputs_and_custom_scale() -> None:
    # [B, S, H, D] projections viewed as [B, H, S, D]: the kernels take the strides, no copy.
    q, k, v, do = _inputs((1, 2, 20, 64), torch.float32, transposed=True)
    assert not q.is_contiguous() and q.stride(-1) == 1
    o = flash_attention(q, k, v, causal=True, scale=0.3)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    ref = _float64_reference(q, k, v, do, causal=True, scale=0.3)
    for ours, expected in zip((o, dq, dk, dv), ref, strict=True):
        assert _max_rel_err(ours, expected) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_log_sum_exp_matches_float64(causal) -> None:
    q, k, v, _ = _inputs((1, 1, 37, 64), torch.float32)
    o, lse = flash_attention_forward(q.detach(), k.detach(), v.detach(), causal=causal)
    scores = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(64)
    if causal:
        scores = scores.masked_fill(torch.ones(37, 37, dtype=torch.bool).triu(1).to(scores.device), -math.inf)
    assert lse.shape == (1, 1, 37) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, dim=-1), rtol=0, atol=1e-5)
    expected = attention_reference(q.double(), k.double(), v.double(), causal)
    torch.testing.assert_close(o.double(), expected, rtol=0, atol=1e-5)


def test_backward_saves_no_score_matrix() -> None:
    # FlashAttention's memory saving: beyond q, k, v and O, the graph keeps one number per query.
    q, k, v, _ = _inputs((1, 2, 37, 64), torch.float32)
    o = flash_attention(q, k, v, causal=True)
    saved = o.grad_fn.saved_tensors
    extra = sum(t.numel() for t in saved) - 4 * q.numel()
    assert extra == 1 * 2 * 37, [tuple(t.shape) for t in saved]


def test_empty_batch() -> None:
    q, k, v, do = _inputs((0, 2, 16, 64), torch.float32)
    o = flash_attention(q, k, v)
    assert o.shape == (0, 2, 16, 64)
    assert all(g.shape == q.shape for g in torch.autograd.grad(o, (q, k, v), do))


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda q, k, v: (q[0], k[0], v[0]), ValueError, r"\[B, H, S, D\]"),
        (lambda q, k, v: (q, k[:, :, :-1], v), ValueError, "one shape"),
        (lambda q, k, v: (q, k.double(), v), TypeError, "dtype"),
        (lambda q, k, v: (q.half(), k, v), TypeError, "one dtype"),
        (lambda q, k, v: (q[..., :32], k[..., :32], v[..., :32]), ValueError, "head dim"),
        (lambda q, k, v: (q, k.transpose(-2, -1), v), ValueError, "contiguous"),
    ],
    ids=["3d", "shapes", "float64", "mixed-dtypes", "head-dim-32", "strided-head-dim"],
)
def test_bad_inputs_raise_clear_errors(make, error, match) -> None:
    # Square [.., 64, 64] tensors, so that a transposed k still has the right shape but a strided last dim.
    q, k, v, _ = _inputs((1, 1, 64, 64), torch.float32)
    with pytest.raises(error, match=match):
        flash_attention(*make(q.detach(), k.detach(), v.detach()))


def test_bad_scale_raises() -> None:
    q, k, v, _ = _inputs((1, 1, 8, 64), torch.float32)
    with pytest.raises(ValueError, match="scale"):
        flash_attention(q, k, v, scale=float("nan"))


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's bf16 limitation")
def test_bf16_is_refused_under_the_interpreter() -> None:
    q, k, v, _ = _inputs((1, 1, 8, 64), torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        flash_attention(q, k, v)


# ----------------------------------------------------------------------------------------------------
# GPU: compiled, autotuned kernels against PyTorch's FlashAttention-2
# ----------------------------------------------------------------------------------------------------


def _sdpa_flash_grads(q, k, v, do, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q2, k2, v2 = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        o = torch.nn.functional.scaled_dot_product_attention(q2, k2, v2, is_causal=causal)
    return (o.detach(), *torch.autograd.grad(o, (q2, k2, v2), do))


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("dtype", "head_dim", "causal"),
    [
        (torch.bfloat16, 64, False),
        (torch.bfloat16, 64, True),
        (torch.bfloat16, 128, False),
        (torch.bfloat16, 128, True),
        (torch.float16, 128, True),
    ],
)
def test_as_accurate_as_sdpa_flash(dtype, head_dim, causal) -> None:
    # S = 1000: whole blocks and a partial last one for every tile; [B, S, H, D] layout, as from a model.
    q, k, v, do = _inputs((2, 4, 1000, head_dim), dtype, device="cuda", transposed=True)
    o = flash_attention(q, k, v, causal=causal)
    ours = (o, *torch.autograd.grad(o, (q, k, v), do))
    theirs = _sdpa_flash_grads(q, k, v, do, causal)
    ref = _float64_reference(q, k, v, do, causal)
    # The bar is FlashAttention-2 in the same dtype: at most twice its error against float64, plus one
    # rounding of the dtype (eps) for tensors it happens to get almost exact.
    eps = torch.finfo(dtype).eps
    for name, a, b, r in zip(("O", "dQ", "dK", "dV"), ours, theirs, ref, strict=True):
        ours_err, theirs_err = _max_rel_err(a, r), _max_rel_err(b, r)
        assert ours_err <= 2 * theirs_err + eps, f"{name}: ours {ours_err:.2e}, SDPA FLASH {theirs_err:.2e}"


@pytest.mark.gpu
def test_fp32_on_gpu_is_full_precision() -> None:
    # fp32 dots with input_precision="ieee": no TF32 rounding (which would give errors around 1e-3).
    q, k, v, do = _inputs((1, 2, 100, 64), torch.float32, device="cuda")
    o = flash_attention(q, k, v, causal=True)
    ours = (o, *torch.autograd.grad(o, (q, k, v), do))
    for a, r in zip(ours, _float64_reference(q, k, v, do, causal=True), strict=True):
        assert _max_rel_err(a, r) < 1e-5


@pytest.mark.gpu
def test_benchmark_cases_run_quick() -> None:
    from common.kernels.flash_attention import benchmark_cases

    for case in benchmark_cases(quick=True):
        ours, theirs = case.ours(), case.baseline()
        ours = ours if isinstance(ours, tuple) else (ours,)
        theirs = theirs if isinstance(theirs, tuple) else (theirs,)
        for a, b in zip(ours, theirs, strict=True):
            assert (a - b).abs().max() <= 0.05 * b.abs().max(), case.label
