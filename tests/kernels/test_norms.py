"""common.kernels.norms against float64 PyTorch norms: RMSNorm and LayerNorm, forward, backward, errors.

On a CPU the kernels run in Triton's interpreter on small, awkward shapes in fp32 and fp16; the `gpu`
tests run compiled kernels at real sizes, bf16 included.

Tolerances. Statistics and products are computed in fp32 and rounded once to the output dtype, so the
error is dominated by that rounding: u |value| with u = 2^-11 (fp16), 2^-8 (bf16); rtol = 2u. Outputs
that are sums over many rows (dw, db: M terms of size ~1) get an absolute tolerance scaled by
sqrt(M) (fp32 partial sums drift like a random walk, far below the output rounding) and by the typical
magnitude of the values compared. fp32 outputs: rtol = 1e-5, which fp32 arithmetic (relative errors of a
few 2^-24 per operation) meets with a wide margin, while any real bug (a missing mean, a wrong N in a
division, a dropped partial) moves results by far more.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from common.kernels import INTERPRETED
from common.kernels import norms as norms_module
from common.kernels.norms import (
    layer_norm,
    layer_norm_reference,
    norm_backward,
    norm_forward,
    rms_norm,
    rms_norm_reference,
)

# Triton's interpreter converts 1-element numpy arrays to int, which numpy >= 1.25 flags as deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

RTOL = {torch.float32: 1e-5, torch.float16: 2 * 2**-11, torch.bfloat16: 2 * 2**-8}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(shape: tuple[int, ...], dtype: torch.dtype, bias: bool, seed: int = 0) -> list[torch.Tensor]:
    """x (mean 0.5, std 2: LayerNorm's centering matters), weight, optional bias, all requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    n = shape[-1]
    tensors = [2 * torch.randn(shape, generator=gen) + 0.5, torch.randn(n, generator=gen)]
    if bias:
        tensors.append(torch.randn(n, generator=gen))
    return [t.to(DEVICE, dtype).requires_grad_() for t in tensors]


def run_both(kind: str, inputs: list[torch.Tensor], dy: torch.Tensor) -> tuple[list, list]:
    """(outputs and grads of our kernel, the same from PyTorch in float64 on the same rounded inputs)."""
    n = inputs[0].shape[-1]
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    if kind == "rms":
        ours = rms_norm(*inputs, eps=1e-6)
        ref = F.rms_norm(ref_inputs[0], (n,), ref_inputs[1], eps=1e-6)
    else:
        ours = layer_norm(*inputs, eps=1e-5)
        ref = F.layer_norm(ref_inputs[0], (n,), *ref_inputs[1:], eps=1e-5)
    grads = torch.autograd.grad(ours, inputs, dy)
    ref_grads = torch.autograd.grad(ref, ref_inputs, dy.double())
    return [ours, *grads], [ref.detach(), *ref_grads]


def assert_close(actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype, atol: float) -> None:
    torch.testing.assert_close(actual.double(), expected64, rtol=RTOL[dtype], atol=atol, check_dtype=False)


def check(kind: str, shape: tuple[int, ...], dtype: torch.dtype, bias: bool = True) -> None:
    inputs = make_inputs(shape, dtype, bias and kind == "layer")
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    ours, ref = run_both(kind, inputs, dy)
    assert ours[0].dtype == dtype and ours[0].shape == inputs[0].shape
    rows = math.prod(shape[:-1])
    unit = RTOL[dtype] / 2
    # y, dx: values ~ |w| * |xhat| ~ a few; rounding ~ u x that.
    assert_close(ours[0], ref[0], dtype, atol=8 * unit)
    assert_close(ours[1], ref[1], dtype, atol=8 * unit)
    # dw, db: sums over rows of terms ~1: magnitude ~sqrt(rows), rounding ~ u x that.
    for got, want in zip(ours[2:], ref[2:], strict=True):
        assert got.dtype == dtype
        assert_close(got, want, dtype, atol=8 * unit * math.sqrt(rows))


# ---------------------------------------------------------------------------------------------------
# CPU (interpreter on a machine without a GPU): small awkward shapes, fp32 and fp16
# ---------------------------------------------------------------------------------------------------

# Under the interpreter a persistent kernel runs 2 programs. (37, 129): N not a power of two, rows not a
# multiple of the 16-row block, 3 blocks for 2 programs (the persistent loop runs twice in one of them).
# (3, 5, 7): leading dims flattened into rows, all packed into one tile. (20, 700): 5 blocks of 4 rows
# for 2 programs, so dw and db add partials of programs that saw different numbers of rows.
SHAPES = [(37, 129), (3, 5, 7), (20, 700)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_forward_backward_match_float64(kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    check(kind, shape, dtype)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_long_row_settings(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    # Rows from LONG_ROW up get a deeper prefetch; on the GPU that is N = 8192 and 16384 (gpu tests below),
    # here the threshold is lowered so the same launch path runs under the interpreter.
    monkeypatch.setattr(norms_module, "LONG_ROW", 128)
    check(kind, (37, 129), torch.float32)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(37, 129), (20, 700)])
def test_two_pass_layer_norm_backward(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], bias: bool
) -> None:
    # On the GPU the two-pass backward takes LayerNorm rows of 16384 (gpu tests below). Here it is switched on
    # for short rows, with chunks small enough that pass 1 loops over each row (129 = 2 x 64 + 1) and pass 2
    # has several column blocks and row groups, so partial sums of groups with different row counts add up.
    monkeypatch.setattr(norms_module, "TWO_PASS_BACKWARD_FROM", 64)
    monkeypatch.setattr(norms_module, "TWO_PASS_ROW_BLOCK_N", 64)
    monkeypatch.setattr(norms_module, "TWO_PASS_TILE", (4, 64))
    check("layer", shape, torch.float32, bias=bias)


def test_layer_norm_without_bias() -> None:
    check("layer", (37, 129), torch.float32, bias=False)


def test_statistics_saved_for_backward() -> None:
    # mean and rstd are what the backward relies on: check them against their definitions.
    x = 2 * torch.randn(9, 33, dtype=torch.float64) + 0.5
    w = torch.ones(33)
    _, mean, rstd = norm_forward(x.float().to(DEVICE), w.to(DEVICE), None, 1e-5, rms=False)
    torch.testing.assert_close(mean.double().cpu(), x.mean(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        rstd.double().cpu(), 1 / torch.sqrt(x.var(-1, unbiased=False) + 1e-5), rtol=1e-5, atol=1e-6
    )
    _, mean, rstd = norm_forward(x.float().to(DEVICE), w.to(DEVICE), None, 1e-6, rms=True)
    assert mean is None
    torch.testing.assert_close(
        rstd.double().cpu(), torch.rsqrt(x.pow(2).mean(-1) + 1e-6), rtol=1e-5, atol=1e-6
    )


def test_references_match_torch() -> None:
    torch.manual_seed(3)
    x, w, b = torch.randn(7, 33, dtype=torch.float64), torch.randn(33, dtype=torch.float64), torch.randn(33)
    torch.testing.assert_close(rms_norm_reference(x, w, 1e-6), F.rms_norm(x, (33,), w, 1e-6))
    b = b.double()
    torch.testing.assert_close(layer_norm_reference(x, w, b, 1e-5), F.layer_norm(x, (33,), w, b, 1e-5))


def test_empty_input() -> None:
    w = torch.ones(8, device=DEVICE)
    y, _, rstd = norm_forward(torch.empty(0, 8, device=DEVICE), w, None, 1e-6, rms=True)
    assert y.shape == (0, 8) and rstd.shape == (0,)
    dx, dw, db = norm_backward(
        torch.empty(0, 8, device=DEVICE), torch.empty(0, 8, device=DEVICE), w, None, rstd, False
    )
    assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros_like(w)) and db is None


def test_bad_input_raises_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    x, w, b = (
        torch.randn(4, 16, device=DEVICE),
        torch.randn(16, device=DEVICE),
        torch.randn(16, device=DEVICE),
    )
    with pytest.raises(ValueError, match=r"weight has shape \(15,\).*must be \(16,\)"):
        rms_norm(x, torch.randn(15, device=DEVICE))
    with pytest.raises(ValueError, match=r"bias has shape"):
        layer_norm(x, w, torch.randn(16, 1, device=DEVICE))
    with pytest.raises(TypeError, match="dtype torch.int32"):
        layer_norm(x, w.to(torch.int32))
    with pytest.raises(ValueError, match="contiguous"):
        rms_norm(torch.randn(16, 4, device=DEVICE).t(), w)
    with pytest.raises(ValueError, match="strided"):
        rms_norm(x, torch.randn(32, device=DEVICE)[::2])
    with pytest.raises(ValueError, match="RMSNorm has no bias"):
        norm_forward(x, w, b, 1e-6, rms=True)
    _, mean, rstd = norm_forward(x, w, b, 1e-5, rms=False)
    with pytest.raises(ValueError, match="dy must match x"):
        norm_backward(torch.randn(4, 15, device=DEVICE), x, w, mean, rstd, True)
    monkeypatch.setattr(norms_module, "MAX_N", 8)
    with pytest.raises(ValueError, match="MAX_N = 8"):
        rms_norm(x, w)


@pytest.mark.skipif(not INTERPRETED, reason="the bf16 refusal applies to Triton's CPU interpreter only")
def test_interpreter_refuses_bfloat16() -> None:
    with pytest.raises(TypeError, match="bfloat16"):
        rms_norm(torch.randn(4, 8, dtype=torch.bfloat16), torch.ones(8, dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------------------------
# GPU: compiled kernels, real shapes, bf16
# ---------------------------------------------------------------------------------------------------

# (8192, 1000): 4 rows per tile, so the tile-shaped dw/db accumulators sum over rows at the end;
# (64, 8192), (256, 16384), (3, 16384): long rows with the deeper prefetch (LONG_ROW); LayerNorm's backward
# takes the two-pass path at 16384.
GPU_SHAPES = [(4096, 4096), (8192, 1000), (2, 1024, 768), (64, 8192), (256, 16384), (3, 16384)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_gpu_forward_backward(kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    check(kind, shape, dtype)


@pytest.mark.gpu
def test_gpu_weight_gradient_is_deterministic() -> None:
    # No atomics: the partial sums are added in a fixed order, so two runs agree bit for bit.
    x, w, b = make_inputs((8192, 1024), torch.bfloat16, bias=True)
    dy = torch.randn_like(x)
    first = torch.autograd.grad(layer_norm(x, w, b), (x, w, b), dy)
    second = torch.autograd.grad(layer_norm(x, w, b), (x, w, b), dy)
    for a, c in zip(first, second, strict=True):
        assert torch.equal(a, c)


@pytest.mark.gpu
def test_gpu_bf16_layer_norm_matches_torch() -> None:
    # PyTorch's LayerNorm kernel also computes in fp32 and rounds once, so on the same bf16 inputs the two
    # outputs differ by at most one bf16 rounding (2^-8 relative; values reach ~8, so ~2^-5 absolute).
    x, w, b = (t.detach() for t in make_inputs((4096, 2048), torch.bfloat16, bias=True))
    torch.testing.assert_close(layer_norm(x, w, b), F.layer_norm(x, (2048,), w, b), rtol=2**-7, atol=2**-4)
