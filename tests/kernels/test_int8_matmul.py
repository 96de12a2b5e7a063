"""common.kernels.int8_matmul against a float64 product: ragged shapes, 1 to 8 rows, bad input.

The kernel sums K products of exact values (x converted to fp32, integer weights) in fp32, scales in fp32
and rounds once to x's dtype. So each output is within one rounding of the dtype of the exact result, plus
fp32 summation error, at most (K + 2) x 2^-24 of the sum of the products' magnitudes (the textbook bound
for a sum of K terms, plus the scaling). That bound is what the tests hold it to: it cannot be exceeded by
a correct kernel, and a wrong index or a missed chunk of K lands far outside it.
"""

from __future__ import annotations

import pytest
import torch

from common.inference.quantization import MAX_DECODE_ROWS, Int8WeightLinear, quantize_int8
from common.kernels import INTERPRETED, int8_matmul
from common.kernels.int8_matmul import int8_weight_matmul, int8_weight_matmul_reference

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _quantized(
    n: int, k: int, dtype: torch.dtype, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = quantize_int8(torch.randn(n, k, generator=generator), dim=-1)
    return q.to(DEVICE), scale.squeeze(1).to(DEVICE, dtype)


def assert_within_bound(y: torch.Tensor, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """y against the exact (float64) (x @ q^T) * scale, within the bound of the module docstring."""
    k = q.shape[1]
    x64, q64, s64 = x.double().reshape(-1, k), q.double(), scale.double()
    exact = (x64 @ q64.T) * s64
    magnitude = (x64.abs() @ q64.abs().T) * s64.abs()
    bound = UNIT_ROUNDOFF[y.dtype] * exact.abs() + (k + 2) * 2.0**-24 * magnitude
    error = (y.double().reshape(exact.shape) - exact).abs()
    worst = (error - bound).argmax()
    assert (error <= bound).all(), (
        f"error {error.flatten()[worst]:.3g} over its bound {bound.flatten()[worst]:.3g}"
    )


@pytest.mark.parametrize("rows", [1, 2, 5, 8])
@pytest.mark.parametrize(("n", "k"), [(40, 96), (37, 200), (8, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_the_exact_product(rows: int, n: int, k: int, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(rows * 1000 + n + k)
    q, scale = _quantized(n, k, dtype, generator)
    x = torch.randn(rows, k, generator=generator).to(DEVICE, dtype)
    y = int8_weight_matmul(x, q, scale)
    assert y.shape == (rows, n) and y.dtype == dtype
    assert_within_bound(y, x, q, scale)


def test_every_int8_value_comes_out_exactly() -> None:
    # The kernel turns int8 into float by bit arithmetic, not a conversion instruction: each of the 256
    # values (-128 too, which quantize_int8 never writes but the operator accepts) must come out as itself.
    n = torch.arange(256)
    q = ((n[:, None] + n[None, :]) % 256 - 128).to(torch.int8)  # column j holds every value once
    picked = torch.tensor([0, 5, 100, 255])
    x = torch.eye(256)[picked]  # row r selects column picked[r] of q
    y = int8_weight_matmul(x.to(DEVICE), q.to(DEVICE), torch.ones(256, device=DEVICE))
    torch.testing.assert_close(y.cpu(), q.T[picked].float(), rtol=0, atol=0)


def test_keeps_leading_dims_and_takes_strided_rows() -> None:
    generator = torch.Generator().manual_seed(1)
    q, scale = _quantized(24, 64, torch.float32, generator)
    x = torch.randn(2, 1, 128, generator=generator).to(DEVICE)[..., ::2]  # (batch, seq, K), strided
    y = int8_weight_matmul(x, q, scale)
    assert y.shape == (2, 1, 24)
    assert_within_bound(y, x.contiguous(), q, scale)


def test_is_an_operator_torch_compile_can_trace() -> None:
    """Schema, fake (meta) implementation and tracing, as torch.library's own checker tests them."""
    generator = torch.Generator().manual_seed(2)
    q, scale = _quantized(16, 32, torch.float32, generator)
    x = torch.randn(1, 1, 32, generator=generator).to(DEVICE)
    torch.library.opcheck(int8_weight_matmul, (x, q, scale))


def test_bad_input_says_what_is_wrong() -> None:
    generator = torch.Generator().manual_seed(3)
    q, scale = _quantized(8, 16, torch.float32, generator)
    x = torch.randn(1, 16, device=DEVICE)
    with pytest.raises(TypeError, match="q has dtype"):
        int8_weight_matmul(x, q.float(), scale)
    with pytest.raises(ValueError, match="last dim must be q's K = 16"):
        int8_weight_matmul(torch.randn(1, 12, device=DEVICE), q, scale)
    with pytest.raises(ValueError, match=r"scale must have shape \(8,\)"):
        int8_weight_matmul(x, q, scale[:4])
    with pytest.raises(ValueError, match="contiguous rows"):
        int8_weight_matmul(x, q.T.contiguous().T, scale)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED, reason="compiled kernels only")
@pytest.mark.parametrize(("n", "k"), [(14336, 4096), (4096, 14336), (1024, 4096)])
@pytest.mark.parametrize("rows", [1, 4])
def test_gpu_llama_shapes_bf16(n: int, k: int, rows: int) -> None:
    generator = torch.Generator().manual_seed(4)
    q, scale = _quantized(n, k, torch.bfloat16, generator)
    x = torch.randn(rows, k, generator=generator).to(DEVICE, torch.bfloat16)
    assert_within_bound(int8_weight_matmul(x, q, scale), x, q, scale)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED, reason="compiled kernels only")
def test_gpu_linear_layer_decodes_through_the_kernel_and_prefills_through_a_matmul() -> None:
    linear = torch.nn.Linear(256, 96, bias=False, device=DEVICE, dtype=torch.bfloat16)
    layer = Int8WeightLinear(linear)
    decode = torch.randn(1, 1, 256, device=DEVICE, dtype=torch.bfloat16)
    torch.testing.assert_close(
        layer(decode), int8_weight_matmul(decode, layer.weight, layer.scale), rtol=0, atol=0
    )
    prefill = torch.randn(1, MAX_DECODE_ROWS + 1, 256, device=DEVICE, dtype=torch.bfloat16)
    expected = int8_weight_matmul_reference(prefill, layer.weight, layer.scale)
    torch.testing.assert_close(layer(prefill), expected, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED, reason="compiled kernels only")
def test_gpu_benchmark_cases_compute_what_their_baselines_do() -> None:
    for case in int8_matmul.benchmark_cases(quick=True):
        ours, baseline = case.ours().float(), case.baseline().float()
        # int8 weights: each within half a step, s / 2, of bf16's; the products differ by ~1% of their size.
        assert (ours - baseline).abs().max() <= 0.05 * baseline.abs().max(), case.label
