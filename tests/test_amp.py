"""common.amp: number formats against torch.finfo and float64, autocast policies, train_step, fp8."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common import amp
from common.amp import FORMATS, Fp8UnsupportedError

# ----------------------------------------------------------------------------------------------------
# Number formats
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if f.dtype is not None])
def test_format_ranges_computed_from_bits_match_torch_finfo(name: str) -> None:
    fmt = FORMATS[name]
    info = torch.finfo(fmt.dtype)
    assert fmt.bits == info.bits
    assert fmt.max == info.max
    assert fmt.eps == info.eps
    assert fmt.smallest_normal == info.smallest_normal


@pytest.mark.parametrize("name", list(FORMATS))
def test_smallest_subnormal_is_the_smallest_value_the_format_keeps(name: str) -> None:
    fmt = FORMATS[name]
    tiny = torch.tensor([fmt.smallest_subnormal], dtype=torch.float64).float()
    assert fmt.round(tiny).item() == fmt.smallest_subnormal
    # Below half of it a value rounds to zero; just above half, it rounds up to the smallest subnormal.
    assert fmt.round(tiny * 0.49).item() == 0
    assert fmt.round(tiny * 0.51).item() == fmt.smallest_subnormal


def test_tf32_format_keeps_ten_mantissa_bits_and_fp32_range() -> None:
    tf32 = FORMATS["tf32"]
    one_plus = torch.tensor([1 + tf32.eps, 1 + tf32.eps / 2, 1 + 0.75 * tf32.eps, tf32.max])
    assert tf32.round(one_plus).tolist() == [1 + tf32.eps, 1.0, 1 + tf32.eps, tf32.max]
    assert tf32.max > 3.4e38 and tf32.smallest_normal == torch.finfo(torch.float32).smallest_normal


def _random_floats(n: int, seed: int = 0) -> torch.Tensor:
    """Random float32 bit patterns: every exponent and mantissa, normal and subnormal, both signs."""
    bits = torch.randint(-(2**31), 2**31 - 1, (n,), generator=torch.Generator().manual_seed(seed))
    x = bits.to(torch.int32).view(torch.float32)
    return x[torch.isfinite(x)]


def test_round_mantissa_to_7_bits_is_exactly_torchs_bf16_conversion() -> None:
    x = _random_floats(200_000)
    # Exact ties (1 + 2**-8 lies halfway between 1 and 1 + 2**-7) must round to the even neighbour.
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2**-130 + 2**-140])
    x = torch.cat([x, ties])
    assert torch.equal(amp.round_mantissa(x, 7), x.to(torch.bfloat16).float())


def test_round_mantissa_to_10_bits_matches_a_float64_reference() -> None:
    x = _random_floats(100_000, seed=1)
    x = x[(x.abs() >= 2.0**-126) & (x.abs() < 2.0**127)]  # normal numbers: the quantum is 2**(exponent - 10)
    xd = x.double().numpy()
    quantum = 2.0 ** (np.floor(np.log2(np.abs(xd))) - 10)
    reference = np.round(xd / quantum) * quantum  # numpy rounds half to even
    np.testing.assert_array_equal(amp.round_mantissa(x, 10).double().numpy(), reference)


def test_round_mantissa_passes_inf_and_nan_and_checks_its_arguments() -> None:
    special = torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0])
    out = amp.round_mantissa(special, 10)
    assert out[:2].tolist() == [math.inf, -math.inf] and math.isnan(out[2].item())
    assert torch.equal(out[3:].view(torch.int32), special[3:].view(torch.int32))  # signed zeros kept
    with pytest.raises(TypeError, match="float32"):
        amp.round_mantissa(special.double(), 10)
    with pytest.raises(ValueError, match=r"\[0, 23\]"):
        amp.round_mantissa(special, 24)


def test_cast_error_counts_underflow_subnormals_overflow_and_relative_error() -> None:
    x = torch.tensor([1.0, 2.0**-26, 2.0**-20, 1e5, 1 + 2.0**-11, 3.0, -(1 + 3 * 2.0**-11), 0.0])
    report = amp.cast_error(x, "fp16")
    assert report.n == 8
    assert report.underflow == 1 / 8  # 2**-26 is below half of fp16's smallest subnormal 2**-24
    assert report.subnormal == 1 / 8  # 2**-20 is kept, below fp16's smallest normal 2**-14
    assert report.overflow == 1 / 8  # 1e5 > 65504
    # Survivors: 1, 2**-20, 1 + 2**-11 (a tie: rounds to even, 1.0), 3, -(1 + 3 * 2**-11) (rounds to -(1 + 2**-9))
    errors = [0, 0, 2.0**-11 / (1 + 2.0**-11), 0, 2.0**-11 / (1 + 3 * 2.0**-11)]
    assert report.max_rel_error == pytest.approx(max(errors), rel=1e-12)
    assert report.median_rel_error == 0.0
    assert "fp16" in str(report)


def test_cast_error_in_bf16_keeps_range_but_loses_precision() -> None:
    x = torch.logspace(-30, 30, 1000, dtype=torch.float64).float()
    fp16, bf16 = amp.cast_error(x, "fp16"), amp.cast_error(x, "bf16")
    assert fp16.underflow > 0.2 and fp16.overflow > 0.2
    assert bf16.underflow == 0 and bf16.overflow == 0
    assert bf16.max_rel_error <= FORMATS["bf16"].eps / 2  # round to nearest: at most half an ulp
    with pytest.raises(ValueError, match="unknown format"):
        amp.cast_error(x, "fp12")
    with pytest.raises(TypeError, match="floating-point"):
        amp.cast_error(torch.arange(3), "fp16")


# ----------------------------------------------------------------------------------------------------
# Autocast and precision policies
# ----------------------------------------------------------------------------------------------------


def test_autocast_on_cpu_runs_matmuls_in_bf16_and_can_be_disabled() -> None:
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    assert amp.default_half_dtype("cpu") == torch.bfloat16
    with amp.autocast("cpu"):
        assert (a @ b).dtype == torch.bfloat16
    with amp.autocast(a, dtype=torch.float16):
        assert (a @ b).dtype == torch.float16
    with amp.autocast("cpu", enabled=False):
        assert (a @ b).dtype == torch.float32


def test_tf32_context_sets_and_restores_the_global_settings() -> None:
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    with amp.tf32(True):
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    with amp.tf32(False):
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    with pytest.raises(RuntimeError), amp.tf32(True):
        raise RuntimeError("restored even on error")
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before


class _RecordPrecision(torch.autograd.Function):
    """Identity whose forward and backward write down the fp32 matmul precision in force when they run."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, seen: dict) -> torch.Tensor:
        ctx.seen = seen
        seen["forward"] = torch.get_float32_matmul_precision()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.seen["backward"] = torch.get_float32_matmul_precision()
        return grad, None


class _RecordingSGD(torch.optim.SGD):
    def __init__(self, params, seen: dict) -> None:
        super().__init__(params, lr=0.1)
        self.seen = seen

    def step(self, closure=None):
        self.seen["optimizer"] = torch.get_float32_matmul_precision()
        return super().step(closure)


@pytest.mark.parametrize(("policy", "expected"), [("tf32", "high"), ("fp32", "highest")])
def test_tf32_setting_covers_forward_backward_and_optimizer_step(policy: str, expected: str) -> None:
    """Backward does two thirds of a step's matmul FLOPs: a TF32 policy that stops after forward is 1/3 TF32."""
    seen: dict[str, str] = {}
    linear = nn.Linear(4, 3)
    before = torch.get_float32_matmul_precision()
    opposite = "highest" if expected == "high" else "high"
    torch.set_float32_matmul_precision(opposite)  # so the policy, not the global default, decides
    try:
        amp.train_step(
            nn.Sequential(linear),
            torch.randn(5, 4),
            torch.randn(5, 3),
            lambda out, y: F.mse_loss(_RecordPrecision.apply(out, seen), y),
            _RecordingSGD(linear.parameters(), seen),
            policy,
        )
        assert seen == {"forward": expected, "backward": expected, "optimizer": expected}
        assert torch.get_float32_matmul_precision() == opposite, "the setting is restored after the step"
    finally:
        torch.set_float32_matmul_precision(before)


def test_precision_policies() -> None:
    assert [name for name, p in amp.PRECISIONS.items() if p.needs_grad_scaler] == ["fp16"]
    assert amp.precision("fp16").grad_scaler("cpu").is_enabled()
    assert not amp.precision("bf16").grad_scaler("cpu").is_enabled()
    assert amp.precision("pure-bf16").prepare(nn.Linear(2, 2)).weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision 'fp64'.*fp32"):
        amp.precision("fp64")


def _regression_problem(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    return model, torch.randn(64, 16), torch.randn(64, 4)


def test_train_step_matches_a_hand_written_step() -> None:
    model, x, y = _regression_problem()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(3):
        loss = amp.train_step(model, x, y, F.mse_loss, opt, "fp32", max_grad_norm=0.5)
        ref_opt.zero_grad()
        ref_loss = F.mse_loss(reference(x), y)
        ref_loss.backward()
        nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        ref_opt.step()
        assert torch.equal(loss, ref_loss.detach()) and not loss.requires_grad
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)


def test_train_step_with_grad_scaler_matches_torchs_documented_loop() -> None:
    model, x, y = _regression_problem()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    policy = amp.precision("fp16")
    scaler, ref_scaler = policy.grad_scaler("cpu"), torch.amp.GradScaler("cpu")
    for _ in range(3):
        amp.train_step(model, x, y, F.mse_loss, opt, policy, scaler=scaler, max_grad_norm=1.0)
        ref_opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            ref_loss = F.mse_loss(reference(x), y)
        ref_scaler.scale(ref_loss).backward()
        ref_scaler.unscale_(ref_opt)
        nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        ref_scaler.step(ref_opt)
        ref_scaler.update()
    assert scaler.get_scale() == ref_scaler.get_scale()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)


def test_loss_scaling_rescues_gradients_that_fp16_would_flush_to_zero() -> None:
    model, x, y = _regression_problem()
    reference = copy.deepcopy(model)

    def tiny_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, target) * 2.0**-20  # output gradients ~1e-8: below fp16's 6e-8

    F.mse_loss(reference(x), y).mul(2.0**-20).backward()
    expected = [p.grad for p in reference.parameters()]

    unscaled = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.float16):
        tiny_loss(unscaled(x), y).backward()
    zero_fraction = sum((p.grad == 0).sum().item() for p in unscaled.parameters()) / sum(
        p.numel() for p in unscaled.parameters()
    )
    assert zero_fraction > 0.5, f"without loss scaling most fp16 gradients underflow, got {zero_fraction:.0%}"

    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: look at the gradients, not the update
    policy = amp.precision("fp16")
    amp.train_step(model, x, y, tiny_loss, opt, policy, scaler=policy.grad_scaler("cpu"))
    for p, g in zip(model.parameters(), expected, strict=True):
        # fp16 keeps 11 significant bits, and the backward does a few roundings in it: 1% is ~20 ulps.
        torch.testing.assert_close(p.grad, g, rtol=1e-2, atol=1e-2 * g.abs().max().item())


def test_train_step_refuses_fp16_without_a_scaler_and_mismatched_weights() -> None:
    model, x, y = _regression_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"needs loss scaling.*grad_scaler"):
        amp.train_step(model, x, y, F.mse_loss, opt, "fp16")
    with pytest.raises(ValueError, match=r"policy.prepare\(model\)"):
        amp.train_step(model, x, y, F.mse_loss, opt, "pure-bf16")


def test_pure_bf16_train_step_casts_inputs_and_trains() -> None:
    model, x, y = _regression_problem()
    policy = amp.precision("pure-bf16")
    policy.prepare(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = [amp.train_step(model, x, y.bfloat16(), F.mse_loss, opt, policy).item() for _ in range(20)]
    assert losses[-1] < 0.9 * losses[0]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


# ----------------------------------------------------------------------------------------------------
# fp8
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [amp.E4M3, amp.E5M2])
def test_to_fp8_uses_the_full_range_and_rounds_within_half_an_ulp(dtype: torch.dtype) -> None:
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 123.0
    data, scale = amp.to_fp8(x, dtype)
    assert data.dtype == dtype and scale.dtype == torch.float32 and scale.dim() == 0
    assert data.float().abs().max().item() == torch.finfo(dtype).max  # amax maps onto the format's max
    restored = data.float() * scale
    fmt = FORMATS["fp8_e4m3" if dtype == amp.E4M3 else "fp8_e5m2"]
    normal = (x / scale).abs() >= fmt.smallest_normal
    # Normal values: relative error at most eps/2 (round to nearest); plus float32 rounding of the scaling.
    rel = ((restored - x).abs() / x.abs())[normal]
    assert rel.max().item() <= fmt.eps / 2 * (1 + 1e-5)


def test_to_fp8_of_zeros_and_bad_dtype() -> None:
    data, scale = amp.to_fp8(torch.zeros(16))
    assert scale.item() == 1.0 and not data.float().any()
    with pytest.raises(ValueError, match="float8_e4m3fn or torch.float8_e5m2"):
        amp.to_fp8(torch.zeros(16), torch.float16)


def test_scaled_mm_checks_shapes_layout_and_dtypes_before_running() -> None:
    a8, sa = amp.to_fp8(torch.randn(32, 64))
    b8, sb = amp.to_fp8(torch.randn(64, 48))
    with pytest.raises(ValueError, match="column-major.*b.t\\(\\).contiguous\\(\\).t\\(\\)"):
        amp.scaled_mm(a8, b8, sa, sb)
    a8_odd, _ = amp.to_fp8(torch.randn(32, 40))
    b8_odd, _ = amp.to_fp8(torch.randn(40, 48))
    with pytest.raises(ValueError, match="multiples of 16, got K=40"):
        amp.scaled_mm(a8_odd, b8_odd.t().contiguous().t(), sa, sb)
    # Any M passes the checks (torch requires only K and N to be multiples of 16): a decode step has M = 1.
    a8_one_row, _ = amp.to_fp8(torch.randn(1, 64))
    with pytest.raises(Fp8UnsupportedError):  # the device check, last, is what stops it on a CPU
        amp.scaled_mm(a8_one_row, b8.t().contiguous().t(), sa, sb)
    with pytest.raises(TypeError, match="must be fp8"):
        amp.scaled_mm(torch.randn(32, 64), b8.t().contiguous().t(), sa, sb)
    with pytest.raises(ValueError, match="inner dimensions"):
        amp.scaled_mm(a8, a8.t().contiguous().t(), sa, sa)
    a5, _ = amp.to_fp8(torch.randn(32, 64), amp.E5M2)
    b5, _ = amp.to_fp8(torch.randn(64, 48), amp.E5M2)
    with pytest.raises(TypeError, match="at most one operand may be e5m2"):
        amp.scaled_mm(a5, b5.t().contiguous().t(), sa, sb)


def test_to_fp8_per_row_scales_each_row_by_its_own_absmax() -> None:
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    x[3] *= 1000.0  # an outlier row: with one scale per row it costs no other row its precision
    data, scale = amp.to_fp8(x, dim=-1)
    assert scale.shape == (8, 1) and scale.dtype == torch.float32
    assert torch.equal(data.float().abs().amax(dim=-1), torch.full((8,), torch.finfo(amp.E4M3).max))
    # Each row within e4m3's half ulp (eps/2) of its values at normal magnitudes, as per tensor above.
    normal = (x / scale).abs() >= FORMATS["fp8_e4m3"].smallest_normal
    rel = ((data.float() * scale - x).abs() / x.abs())[normal]
    assert rel.max().item() <= FORMATS["fp8_e4m3"].eps / 2 * (1 + 1e-5)


def test_scaled_mm_checks_row_wise_scales() -> None:
    a8, sa = amp.to_fp8(torch.randn(32, 64), dim=-1)  # (32, 1)
    b8, sb = amp.to_fp8(torch.randn(48, 64), dim=-1)  # (48, 1): b's rows are the GEMM's columns
    b8 = b8.t()  # (64, 48), column-major
    with pytest.raises(ValueError, match=r"scale_b \(1, 48\).*got scale_a \(32, 1\) and scale_b \(48, 1\)"):
        amp.scaled_mm(a8, b8, sa, sb)
    with pytest.raises(ValueError, match="write bf16.*out_dtype torch.float32"):
        amp.scaled_mm(a8, b8, sa, sb.t(), out_dtype=torch.float32)
    with pytest.raises(ValueError, match="scale_a must be a float32 tensor, got torch.bfloat16"):
        amp.scaled_mm(a8, b8, sa.bfloat16(), sb.t())
    with pytest.raises(Fp8UnsupportedError):  # the shapes are right: only the CPU stops it
        amp.scaled_mm(a8, b8, sa, sb.t())


def test_fp8_matmul_on_cpu_is_a_clear_error() -> None:
    a, b = torch.randn(32, 64), torch.randn(64, 48)
    with pytest.raises(Fp8UnsupportedError, match=r"compute capability >= 8\.9.*on cpu.*to_fp8"):
        amp.fp8_matmul(a, b)
    assert not amp.fp8_supported("cpu")


@pytest.mark.gpu
def test_fp8_matmul_refuses_a_gpu_without_fp8_tensor_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # as on an A100
    a = torch.randn(32, 64, device="cuda")
    assert not amp.fp8_supported()
    with pytest.raises(Fp8UnsupportedError, match=r"sm_80"):
        amp.fp8_matmul(a, a.t())


@pytest.mark.gpu
@pytest.mark.parametrize("a_dtype", [amp.E4M3, amp.E5M2], ids=["e4m3", "e5m2"])
def test_fp8_matmul_matches_float_references(a_dtype: torch.dtype) -> None:
    if not amp.fp8_supported():
        pytest.skip("fp8 tensor cores need compute capability >= 8.9 (the refusal is tested above)")
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(256, 512, device="cuda", generator=g)
    b = torch.randn(512, 384, device="cuda", generator=g)
    out = amp.fp8_matmul(a, b, a_dtype=a_dtype, out_dtype=torch.float32)
    assert out.shape == (256, 384) and out.dtype == torch.float32

    # 1. Against the exact product of the quantized operands: only the GEMM's own accumulation differs.
    # Hopper's fp8 tensor cores accumulate with ~14 significant bits before cuBLAS promotes partial sums to
    # fp32 (DeepSeek-V3 report, sec. 3.3.2): relative error ~1e-4; 1e-3 leaves a 10x margin.
    (a8, sa), (b8, sb) = amp.to_fp8(a, a_dtype), amp.to_fp8(b, amp.E4M3)
    exact = (a8.double() * sa.double()) @ (b8.double() * sb.double())
    assert ((out.double() - exact).norm() / exact.norm()).item() < 1e-3

    # 2. Against the float64 product of the original operands: the error is fp8 rounding. Each operand
    # element is off by up to eps/2 (e4m3: 6.25%, e5m2: 12.5%), at most eps/sqrt(12) rms; the two operands'
    # errors add in quadrature: sqrt(eps_a^2 + eps_b^2) / sqrt(12) is 5.1% for e4m3 x e4m3 and 8.1% for
    # e5m2 x e4m3. Bound at 1.5x that.
    reference = a.double() @ b.double()
    error = ((out.double() - reference).norm() / reference.norm()).item()
    bound = math.hypot(torch.finfo(a_dtype).eps, torch.finfo(amp.E4M3).eps) / math.sqrt(12)
    assert error < 1.5 * bound, (error, bound)
    bf16_error = ((a.bfloat16() @ b.bfloat16()).double() - reference).norm() / reference.norm()
    assert error > 4 * bf16_error.item(), "fp8 is much coarser than bf16"


@pytest.mark.gpu
def test_fp8_matmul_checks_shapes_on_the_gpu() -> None:
    if not amp.fp8_supported():
        pytest.skip("fp8 tensor cores need compute capability >= 8.9 (the refusal is tested above)")
    a = torch.randn(32, 24, device="cuda")
    with pytest.raises(ValueError, match="multiples of 16, got K=24"):
        amp.fp8_matmul(a, torch.randn(24, 32, device="cuda"))


@pytest.mark.gpu
def test_scaled_mm_row_wise_with_one_row_matches_the_dequantized_product() -> None:
    if not amp.fp8_supported():
        pytest.skip("fp8 tensor cores need compute capability >= 8.9 (the refusal is tested above)")
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(1, 256, device="cuda", generator=g)  # M = 1: one decode step's activations
    b = torch.randn(128, 256, device="cuda", generator=g)
    (a8, sa), (b8, sb) = amp.to_fp8(a, dim=-1), amp.to_fp8(b, dim=-1)
    out = amp.scaled_mm(a8, b8.t(), sa, sb.t())
    exact = (a8.double() * sa.double()) @ (b8.double() * sb.double()).t()
    # The product of the quantized operands, up to the bf16 rounding of the output (relative 2^-9 per
    # element) and the tensor cores' accumulation (~1e-4, see above): 1% of the norm has a wide margin.
    assert ((out.double() - exact).norm() / exact.norm()).item() < 1e-2


# ----------------------------------------------------------------------------------------------------
# The week-3 benchmarks built on this module (common.bench_pipelines)
# ----------------------------------------------------------------------------------------------------


def test_pipeline_result_judges_its_goal() -> None:
    from common.bench import Comparison, result_from_times, speedup_summary
    from common.bench_pipelines import PipelineResult

    base = result_from_times("fp32", [4.0, 4.2, 3.9], timer="perf_counter", cache="warm")
    cand = result_from_times("bf16", [1.0, 1.1, 1.0], timer="perf_counter", cache="warm")
    s = speedup_summary(base.times_ms, cand.times_ms)
    comparison = Comparison(base, cand, s["speedup"], s["speedup_p20"], s["speedup_p80"], s["ratios"])
    result = PipelineResult("step", "a step", goal=2.0, config={}, comparison=comparison)
    assert result.met and result.to_dict()["goal"] == {
        "metric": "speedup",
        "op": ">=",
        "value": 2.0,
        "met": True,
    }
    result.goal = 5.0
    assert result.met is False
    skipped = PipelineResult("fp8", "fp8", goal=1.5, config={}, skipped="no fp8")
    assert skipped.met is None and skipped.to_dict()["skipped"] == "no fp8"


def test_pipeline_benchmarks_need_a_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from common.bench_pipelines import run_pipeline_benchmarks
    from common.hardware import NoGPUError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NoGPUError, match="need a CUDA GPU"):
        run_pipeline_benchmarks(tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.gpu
@pytest.mark.slow
def test_pipeline_benchmarks_quick_run_writes_json(tmp_path) -> None:
    import json

    from common.bench_pipelines import run_pipeline_benchmarks

    paths = run_pipeline_benchmarks(tmp_path, quick=True)
    assert sorted(p.name for p in paths) == [
        "pipelines_autocast_step_quick.json",
        "pipelines_fp8_gemm_quick.json",
        "pipelines_jpeg_decode_quick.json",
    ]
    for path in paths:
        record = json.loads(path.read_text())
        assert record["quick"] is True and record["environment"]["gpu"]
        if record["skipped"] is None:
            comparison = record["comparison"]
            assert record["goal"]["met"] == (record["speedup"] >= record["goal"]["value"])
            assert comparison["speedup_p20"] <= record["speedup"] <= comparison["speedup_p80"]
            # the median of per-pair ratios sits near the ratio of the two medians (interleaved, same GPU)
            medians = comparison["baseline"]["median_ms"] / comparison["candidate"]["median_ms"]
            assert record["speedup"] == pytest.approx(medians, rel=0.25)
    step = json.loads((tmp_path / "pipelines_autocast_step_quick.json").read_text())
    assert step["speedup"] > 1, "bf16 autocast beats fp32 without TF32 even at the quick size"
    jpeg = json.loads((tmp_path / "pipelines_jpeg_decode_quick.json").read_text())["comparison"]
    for side in ("baseline", "candidate"):  # both decoders timed on the GPU's clock, and the GPU recorded
        assert jpeg[side]["timer"] == "cuda_event" and jpeg[side]["env"]["gpu"], jpeg[side]["env"]


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
def test_block_flops_match_pytorchs_flop_counter(backward: bool) -> None:
    """The TFLOP/s of the block benchmarks rest on block_flops; FlopCounterMode counts every matmul itself."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from common.models.transformer import TransformerBlock, block_flops

    block = TransformerBlock(64, 4, causal=False)
    x = torch.randn(2, 32, 64, requires_grad=True)
    # The math backend writes attention as two batched matmuls, which the counter sees (fused kernels it may
    # not). Without a causal mask nothing is skipped, so the counts must agree exactly.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = block(x)
        if backward:
            out.sum().backward()
    assert counter.get_total_flops() == block_flops(2, 32, 64, causal=False, backward=backward)
    # Causal: fused kernels skip the masked half of the attention matmuls, and block_flops counts that half.
    full, causal = block_flops(2, 32, 64, causal=False), block_flops(2, 32, 64, causal=True)
    assert full - causal == 3 * 2 * 32 * (2 * 32 * 64)
