"""common.kernels.softmax against a float64 softmax: forward, backward, the long-row path, bad input.

On a CPU the kernels run in Triton's interpreter on small, awkward shapes in fp32 and fp16; the `gpu`
tests run compiled kernels at real sizes, bf16 included.

Tolerances. The kernels compute in fp32 and round once to the output dtype, so the error is about one
rounding of the output: |y - y64| <= u |y64|, unit roundoff u = 2^-11 (fp16), 2^-8 (bf16). Softmax
outputs lie in [0, 1], so rtol = 2u with atol = u covers that rounding and the few fp32 operations before
it. For fp32 outputs the fp32 arithmetic itself dominates: exp and a row sum of N terms each carry
relative errors of a few 2^-24 (~1e-7), so rtol = 1e-5 leaves a wide margin yet catches any real bug
(a wrong max, a missing term, a stale row), which moves results by far more.
"""

from __future__ import annotations

import pytest
import torch

from common.kernels import INTERPRETED
from common.kernels import softmax as softmax_module
from common.kernels.softmax import softmax, softmax_backward, softmax_forward, softmax_reference

# Triton's interpreter converts 1-element numpy arrays to int, which numpy >= 1.25 flags as deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float16: {"rtol": 2 * 2**-11, "atol": 2**-11},
    torch.bfloat16: {"rtol": 2 * 2**-8, "atol": 2**-8},
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference64(x: torch.Tensor, dy: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax and its input gradient in float64, with PyTorch's own ops (independent of the kernels)."""
    x64 = x.detach().double().requires_grad_()
    y64 = torch.softmax(x64, dim=-1)
    if dy is None:
        return y64.detach(), None
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    return y64.detach(), dx64


def assert_close(
    actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
) -> None:
    tol = TOL[dtype]
    torch.testing.assert_close(
        actual.double(), expected64, rtol=tol["rtol"], atol=tol["atol"] * scale, check_dtype=False
    )


# ---------------------------------------------------------------------------------------------------
# CPU (interpreter on a machine without a GPU): small awkward shapes, fp32 and fp16
# ---------------------------------------------------------------------------------------------------

# Under the interpreter a persistent kernel runs 2 programs. (37, 129): N not a power of two, rows not a
# multiple of the 16-row block, 3 blocks for 2 programs (the persistent loop runs twice in one of them).
# (3, 5, 7): leading dims flattened into rows. (300, 16): short rows packed 256 to a tile. (20, 700): a
# wide ragged row, 4 rows per tile. (1, 1): the smallest.
SHAPES = [(37, 129), (3, 5, 7), (300, 16), (20, 700), (1, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_float64(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = (3 * torch.randn(shape)).to(DEVICE, dtype)
    y = softmax_forward(x)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, reference64(x)[0], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(37, 129), (3, 5, 7)])
def test_backward_matches_float64(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    x = (3 * torch.randn(shape)).to(DEVICE, dtype).requires_grad_()
    dy = torch.randn(shape).to(DEVICE, dtype)
    (dx,) = torch.autograd.grad(softmax(x), x, dy)
    _, dx64 = reference64(x, dy)
    # dx = y (dy - <y, dy>): |dy| ~ 1 and |<y, dy>| <= max|dy| ~ 4, so the rounding scale is ~4, not 1.
    assert_close(dx, dx64, dtype, scale=4.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_long_rows_use_the_online_kernels(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    # Shrink the limits so a 129-wide row takes the online path in five 32-wide chunks (the last ragged).
    monkeypatch.setattr(softmax_module, "MAX_FUSED_N", 64)
    monkeypatch.setattr(softmax_module, "MAX_FUSED_N_BACKWARD", 64)
    monkeypatch.setattr(softmax_module, "LONG_BLOCK_N", 32)
    torch.manual_seed(2)
    x = (3 * torch.randn(6, 129)).to(DEVICE, dtype)
    x[0, :40] = float("-inf")  # a masked prefix: lanes that see only -inf in the first chunk
    x[1, 5] = 30.0  # a large maximum arriving in the first chunk
    x[2, 120] = 30.0  # ...and in the last one, which rescales the running sum
    x = x.requires_grad_()
    dy = torch.randn(6, 129).to(DEVICE, dtype)
    y = softmax(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    y64, dx64 = reference64(x, dy)
    assert_close(y, y64, dtype)
    assert_close(dx, dx64, dtype, scale=4.0)


def test_masked_entries_and_large_values() -> None:
    # -inf (attention masks) contributes exp(-inf) = 0; values near fp32's range must not overflow.
    x = torch.tensor([[0.0, float("-inf"), 1.0, float("-inf")], [1e30, 1e30 - 1e24, -1e30, 0.0]])
    y = softmax_forward(x.to(DEVICE))
    assert torch.isfinite(y).all()
    assert_close(y, reference64(x)[0], torch.float32)


def test_reference_matches_torch() -> None:
    torch.manual_seed(3)
    x = torch.randn(7, 33, dtype=torch.float64)
    torch.testing.assert_close(softmax_reference(x), torch.softmax(x, dim=-1))


def test_empty_input() -> None:
    for shape in [(0, 5), (4, 0)]:
        x = torch.empty(shape, device=DEVICE)
        assert softmax_forward(x).shape == shape


def test_bad_input_raises_clear_errors() -> None:
    x = torch.randn(8, 16, device=DEVICE)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        softmax_forward(torch.ones(4, 4, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        softmax_forward(x.t())  # last-dim stride 8
    with pytest.raises(ValueError, match="scalar"):
        softmax_forward(torch.tensor(1.0, device=DEVICE))
    with pytest.raises(TypeError, match="torch.Tensor"):
        softmax_forward([[1.0, 2.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dy must match y"):
        softmax_backward(softmax_forward(x), torch.randn(8, 15, device=DEVICE))


@pytest.mark.skipif(not INTERPRETED, reason="the bf16 refusal applies to Triton's CPU interpreter only")
def test_interpreter_refuses_bfloat16() -> None:
    with pytest.raises(TypeError, match="bfloat16"):
        softmax_forward(torch.randn(4, 8, dtype=torch.bfloat16))


@pytest.mark.skipif(INTERPRETED, reason="compiled Triton needs CUDA tensors; the interpreter takes CPU ones")
def test_compiled_kernels_refuse_cpu_tensors() -> None:
    with pytest.raises(ValueError, match="cuda"):
        softmax_forward(torch.randn(4, 8))


# ---------------------------------------------------------------------------------------------------
# GPU: compiled kernels, real shapes, bf16
# ---------------------------------------------------------------------------------------------------

GPU_SHAPES = [(4096, 4096), (8192, 1000), (1000, 256), (64, 32768), (16, 100_003)]  # the last: online path


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_forward_backward(shape: tuple[int, int], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = (3 * torch.randn(shape, device="cuda")).to(dtype).requires_grad_()
    dy = torch.randn(shape, device="cuda").to(dtype)
    y = softmax(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    y64, dx64 = reference64(x, dy)
    assert_close(y, y64, dtype)
    assert_close(dx, dx64, dtype, scale=4.0)


@pytest.mark.gpu
def test_gpu_batched_bf16_matches_torch_softmax() -> None:
    # Same inputs, same output dtype: our rounding and PyTorch's may differ by one bf16 ulp, no more.
    x = torch.randn(4, 16, 512, 1024, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(softmax(x), torch.softmax(x, dim=-1), rtol=2**-7, atol=2**-9)


@pytest.mark.gpu
def test_gpu_persistent_grid_is_one_full_wave() -> None:
    # The grid must be exactly what fits on the GPU at once: registers, threads and shared memory of the
    # compiled kernel times the programs per SM stay within one SM's budget, and one more would not fit.
    from common.kernels import persistent_grid, programs_per_sm, row_tile

    x = torch.randn(65536, 4096, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    block_m, block_n, num_warps, num_stages = row_tile(4096, 2)
    args = (x, y, x.shape[0], x.shape[1], x.stride(0), y.stride(0))
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "NUM_STAGES": num_stages, "num_warps": num_warps}
    kernel = softmax_module._softmax_fwd_kernel
    per_sm = programs_per_sm(kernel, args, meta)
    compiled = kernel.warmup(*args, grid=(1,), **meta)
    props = torch.cuda.get_device_properties(x.device)
    threads = 32 * num_warps
    assert per_sm * compiled.n_regs * threads <= props.regs_per_multiprocessor
    assert per_sm * threads <= props.max_threads_per_multi_processor
    assert per_sm * compiled.metadata.shared <= props.shared_memory_per_multiprocessor
    one_more = per_sm + 1
    assert (
        one_more * compiled.n_regs * threads > props.regs_per_multiprocessor
        or one_more * threads > props.max_threads_per_multi_processor
        or one_more * compiled.metadata.shared > props.shared_memory_per_multiprocessor
    )
    assert persistent_grid(kernel, 10**9, args, meta) == (props.multi_processor_count * per_sm,)
    assert persistent_grid(kernel, 3, args, meta) == (3,)
