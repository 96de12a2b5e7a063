"""Fused linear + cross-entropy: loss, dh and dW against eager PyTorch in float64; input checks.

On CPU the Triton kernel runs in the interpreter on small, awkward shapes: N = 37 tokens in chunks of 16
(a partial last chunk), a vocabulary of 300 (two full blocks of the interpreter's 128 and a partial one),
some ignored tokens. On a GPU (`-m gpu`): real sizes, bf16, and the peak memory against eager.
"""

from __future__ import annotations

import pytest
import torch

from common.kernels import INTERPRETED
from common.kernels.cross_entropy import (
    BLOCK_V,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)

# Triton's interpreter converts 1-element numpy arrays to int, which numpy >= 1.25 flags as deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

N, H, V, CHUNK = 37, 24, 300, 16
# The awkward-shape claims above hold for the block the interpreter uses.
assert not INTERPRETED or (V % BLOCK_V != 0 and V > 2 * BLOCK_V and N % CHUNK != 0)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(n, h, v, dtype, device=DEVICE, ignore_index=-100):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g)
    # Logits of std ~1.5 (h ~ N(0, 1), W ~ N(0, 1.5^2 / H) summed over H): a realistic spread of the
    # softmax, neither flat nor one-hot.
    weight = 1.5 / h**0.5 * torch.randn(v, h, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = ignore_index  # every fifth token is padding
    return (
        hidden.to(device, dtype).requires_grad_(True),
        weight.to(device, dtype).requires_grad_(True),
        targets.to(device),
    )


def _float64_reference(hidden, weight, targets, **kwargs):
    """Loss, dh, dW of eager PyTorch in float64: the ground truth."""
    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    loss = linear_cross_entropy_reference(h64, w64, targets, **kwargs)
    dh, dw = torch.autograd.grad(loss, (h64, w64))
    return loss.detach(), dh, dw


def _max_rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error relative to the largest reference magnitude (robust to near-zero entries)."""
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


# Tolerances, relative to the largest magnitude of each quantity. fp32: the kernel and the matmuls round in
# fp32 (eps 6e-8) over sums of a few hundred terms: 1e-5 leaves a wide margin. fp16: the logits and dz are
# rounded to fp16 (eps 4.9e-4) as in eager, and dW is re-rounded once per chunk (3 chunks here): a few eps
# in all, so 5e-3.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_and_gradients_match_float64_eager(dtype, reduction) -> None:
    hidden, weight, targets = _inputs(N, H, V, dtype)
    loss = linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_size=CHUNK)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    ref_loss, ref_dh, ref_dw = _float64_reference(hidden, weight, targets, reduction=reduction)
    tol = TOLERANCE[dtype]
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert _max_rel_err(loss, ref_loss) < tol, (loss.item(), ref_loss.item())
    assert dh.dtype == dtype and dw.dtype == dtype
    assert _max_rel_err(dh, ref_dh) < tol
    assert _max_rel_err(dw, ref_dw) < tol
    # Ignored tokens get no gradient at all.
    assert torch.all(dh[::5] == 0)


def test_upstream_gradient_scales_the_result() -> None:
    # The gradients are computed in the forward for d(loss) = 1 and scaled in the backward: check the
    # scaling with a gradient that is not 1, here through 3 * loss.
    hidden, weight, targets = _inputs(N, H, V, torch.float32)
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=CHUNK)
    dh, dw = torch.autograd.grad(3.0 * loss, (hidden, weight))
    _, ref_dh, ref_dw = _float64_reference(hidden, weight, targets)
    assert _max_rel_err(dh, 3 * ref_dh) < 1e-5
    assert _max_rel_err(dw, 3 * ref_dw) < 1e-5


def test_custom_ignore_index_int32_targets_and_default_chunk() -> None:
    hidden, weight, targets = _inputs(N, H, V, torch.float32, ignore_index=7)
    targets = targets.to(torch.int32)
    loss = linear_cross_entropy(hidden, weight, targets, ignore_index=7)  # one chunk of all 37 tokens
    ref_loss, ref_dh, ref_dw = _float64_reference(hidden, weight, targets.long(), ignore_index=7)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    assert _max_rel_err(loss, ref_loss) < 1e-5
    assert _max_rel_err(dh, ref_dh) < 1e-5 and _max_rel_err(dw, ref_dw) < 1e-5


def test_strided_inputs_are_read_in_place() -> None:
    # A transposed hidden, a weight slice and every other target: no copies needed, and same results.
    hidden, weight, targets = _inputs(N, H, V, torch.float32)
    hidden_t = hidden.detach().t().contiguous().t().requires_grad_(True)  # [N, H] with strides (1, N)
    targets_wide = torch.stack([targets, torch.zeros_like(targets)], dim=1)  # targets = column 0
    strided_targets = targets_wide[:, 0]
    assert not hidden_t.is_contiguous() and not strided_targets.is_contiguous()
    loss = linear_cross_entropy(hidden_t, weight, strided_targets, chunk_size=CHUNK)
    ref_loss, ref_dh, ref_dw = _float64_reference(hidden, weight, targets)
    dh, dw = torch.autograd.grad(loss, (hidden_t, weight))
    assert _max_rel_err(loss, ref_loss) < 1e-5
    assert _max_rel_err(dh, ref_dh) < 1e-5 and _max_rel_err(dw, ref_dw) < 1e-5


@pytest.mark.parametrize("needs", ["hidden", "weight", "none"])
def test_only_the_gradients_autograd_needs(needs) -> None:
    hidden, weight, targets = _inputs(N, H, V, torch.float32)
    hidden.requires_grad_(needs == "hidden")
    weight.requires_grad_(needs == "weight")
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=CHUNK)
    ref_loss, ref_dh, ref_dw = _float64_reference(hidden, weight, targets)
    assert _max_rel_err(loss, ref_loss) < 1e-5
    if needs == "none":
        assert loss.grad_fn is None
        return
    (grad,) = torch.autograd.grad(loss, hidden if needs == "hidden" else weight)
    assert _max_rel_err(grad, ref_dh if needs == "hidden" else ref_dw) < 1e-5


def test_out_of_range_target_makes_the_loss_nan() -> None:
    hidden, weight, targets = _inputs(8, H, V, torch.float32)
    targets[3] = V  # one past the end; eager would fail with a device-side assert on a GPU
    loss = linear_cross_entropy(hidden, weight, targets, reduction="sum")
    assert torch.isnan(loss)
    dh, _ = torch.autograd.grad(loss, (hidden, weight))
    assert torch.isnan(dh[3]).all() and not torch.isnan(dh[4]).any()


def test_all_tokens_ignored_gives_nan_mean_like_eager() -> None:
    hidden, weight, targets = _inputs(4, H, V, torch.float32)
    targets.fill_(-100)
    with torch.no_grad():
        ours = linear_cross_entropy(hidden, weight, targets)
        eager = linear_cross_entropy_reference(hidden, weight, targets)
    assert torch.isnan(ours) and torch.isnan(eager)


def test_no_tokens_follows_eager() -> None:
    hidden, weight, targets = _inputs(0, H, V, torch.float32)
    assert linear_cross_entropy(hidden, weight, targets, reduction="sum").item() == 0.0
    assert torch.isnan(linear_cross_entropy(hidden, weight, targets))


def test_second_backward_raises() -> None:
    hidden, weight, targets = _inputs(8, H, V, torch.float32)
    loss = linear_cross_entropy(hidden, weight, targets)
    torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        torch.autograd.grad(loss, (hidden, weight))


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda h, w, t: (h[None], w, t), ValueError, r"\[N, H\]"),
        (lambda h, w, t: (h, w[:, :-1], t), ValueError, "hidden size"),
        (lambda h, w, t: (h, w.double(), t), TypeError, "dtype"),
        (lambda h, w, t: (h.long(), w, t), TypeError, "dtype"),
        (lambda h, w, t: (h, w, t.float()), TypeError, "class indices"),
        (lambda h, w, t: (h, w, t[:-1]), ValueError, "one class index per row"),
        (lambda h, w, t: (h, w[:0], t), ValueError, "no classes"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, error, match) -> None:
    hidden, weight, targets = _inputs(8, H, V, torch.float32)
    with pytest.raises(error, match=match):
        linear_cross_entropy(*change(hidden.detach(), weight.detach(), targets))


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"reduction": "none"}, "mean' or 'sum"), ({"chunk_size": 0}, "chunk_size")]
)
def test_bad_options_raise_clear_errors(kwargs, match) -> None:
    hidden, weight, targets = _inputs(8, H, V, torch.float32)
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(hidden, weight, targets, **kwargs)


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's bf16 limitation")
def test_bf16_is_refused_under_the_interpreter() -> None:
    hidden, weight, targets = _inputs(8, H, V, torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        linear_cross_entropy(hidden, weight, targets)


# ----------------------------------------------------------------------------------------------------
# GPU: real sizes, bf16, memory
# ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bf16_is_as_accurate_as_eager(reduction) -> None:
    # A vocabulary that is not a multiple of the 4096 block, 3000 tokens in chunks of 1024 (a partial one).
    hidden, weight, targets = _inputs(3000, 1024, 50_000, torch.bfloat16, device="cuda")
    loss = linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_size=1024)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    eager = linear_cross_entropy_reference(hidden, weight, targets, reduction=reduction)
    eager_dh, eager_dw = torch.autograd.grad(eager, (hidden, weight))
    ref_loss, ref_dh, ref_dw = _float64_reference(hidden, weight, targets, reduction=reduction)
    # The bar is eager bf16 itself. Ours rounds dW to bf16 once per chunk (3 times here) where eager rounds
    # it once, so it may be up to 3x as far from float64 (about 1.9x is typical); the loss and dh are
    # rounded as often as eager's. Plus 1e-3 (a quarter of a bf16 rounding) where eager is almost exact.
    for ours, theirs, ref in [(loss, eager, ref_loss), (dh, eager_dh, ref_dh), (dw, eager_dw, ref_dw)]:
        assert _max_rel_err(ours, ref) <= 3 * _max_rel_err(theirs, ref) + 1e-3


@pytest.mark.gpu
def test_peak_memory_is_a_fraction_of_eager() -> None:
    # N V = 8192 x 32768: eager holds three [N, V] bf16 tensors (1.5 GiB) in its backward; ours one chunk of
    # 256 MiB (4096 tokens) plus dW (64 MiB) and dh (16 MiB). Expect ~0.2; the test allows up to 1/3.
    hidden, weight, targets = _inputs(8192, 1024, 32768, torch.bfloat16, device="cuda")

    def peak(loss_fn) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.autograd.grad(loss_fn(hidden, weight, targets), (hidden, weight))
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    peak(linear_cross_entropy)  # warm-up: cuBLAS workspaces are allocated once, outside the comparison
    peak(linear_cross_entropy_reference)
    ours, eager = peak(linear_cross_entropy), peak(linear_cross_entropy_reference)
    assert ours < eager / 3, f"peak memory: ours {ours / 2**20:.0f} MiB, eager {eager / 2**20:.0f} MiB"


@pytest.mark.gpu
def test_benchmark_cases_run_quick() -> None:
    from common.kernels.cross_entropy import benchmark_cases

    for case in benchmark_cases(quick=True):
        dh, dw = case.ours()
        ref_dh, ref_dw = case.baseline()
        assert (dh - ref_dh).abs().max() <= 0.05 * ref_dh.abs().max()
        assert (dw - ref_dw).abs().max() <= 0.05 * ref_dw.abs().max()
