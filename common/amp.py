"""Mixed precision: number formats, autocast, a training step with loss scaling, and an fp8 matmul.

Lower precision buys speed (tensor cores run bf16/fp16 at 2x TF32 and ~15x fp32 CUDA cores, fp8 at 2x bf16)
and memory (half the bytes per activation), and costs range and precision. This module makes both sides
measurable:

    FORMATS["fp16"].smallest_subnormal        # 2**-24: anything smaller becomes 0 in fp16
    cast_error(grads, "fp16").underflow       # the fraction of these gradients fp16 would flush to zero

    policy = precision("fp16")                # autocast to fp16, fp32 weights, loss scaling needed
    scaler = policy.grad_scaler(device)       # torch.amp.GradScaler, once, outside the loop
    loss = train_step(model, x, y, loss_fn, optimizer, policy, scaler=scaler)

    c = fp8_matmul(a, b)                      # per-tensor scaled e4m3 GEMM via torch._scaled_mm (sm_89+)

Loss scaling here is PyTorch's own `torch.amp.GradScaler`: how a scaler works inside is an exercise of the
week-3 assignment.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from common.errors import EffdlError

__all__ = [
    "E4M3",
    "E5M2",
    "FORMATS",
    "PRECISIONS",
    "CastReport",
    "FloatFormat",
    "Fp8UnsupportedError",
    "Precision",
    "autocast",
    "cast_error",
    "default_half_dtype",
    "fp8_matmul",
    "fp8_supported",
    "precision",
    "round_mantissa",
    "scaled_mm",
    "tf32",
    "to_fp8",
    "train_step",
]

E4M3 = torch.float8_e4m3fn  # fp8 for weights and activations: more precision, max 448
E5M2 = torch.float8_e5m2  # fp8 for gradients: more range, max 57344


# ----------------------------------------------------------------------------------------------------
# Number formats
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format: 1 sign bit, `exponent_bits`, `mantissa_bits` (stored, no implicit 1).

    The range and precision follow from the bit counts alone (computed below, not looked up), so the
    table of FORMATS is also a worked example of where 65504 or 448 come from.
    finite_only: the all-ones exponent encodes numbers, not inf (fp8 e4m3 "fn": only all-ones is NaN),
    which buys one more binade of range.
    dtype: the torch dtype that stores the format; None for TF32, a tensor-core compute mode on fp32 data.
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    dtype: torch.dtype | None
    finite_only: bool = False

    @property
    def bias(self) -> int:
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def max(self) -> float:
        """The largest finite value."""
        top = 2**self.exponent_bits - 1  # the all-ones exponent field
        if self.finite_only:  # top exponent in use; its all-ones mantissa is NaN
            return (2 - 2.0 ** (1 - self.mantissa_bits)) * 2.0 ** (top - self.bias)
        return (2 - 2.0**-self.mantissa_bits) * 2.0 ** (top - 1 - self.bias)

    @property
    def eps(self) -> float:
        """Machine epsilon: the gap between 1 and the next value; relative rounding error is at most eps/2."""
        return 2.0**-self.mantissa_bits

    @property
    def smallest_normal(self) -> float:
        """Below this, values are subnormal: fewer significant bits, so larger relative error."""
        return 2.0 ** (1 - self.bias)

    @property
    def smallest_subnormal(self) -> float:
        """The smallest positive value; anything below half of it rounds to zero."""
        return 2.0 ** (1 - self.bias - self.mantissa_bits)

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """x rounded to this format and returned as float32, so it can be compared with the original.

        Casts go through the storage dtype (torch's conversions round to nearest even; out-of-range values
        become inf, or NaN in fp8 e4m3, which has no inf). TF32 has no storage dtype: its rounding is emulated
        by rounding fp32's mantissa to 10 bits.
        """
        x = x.float()
        if self.dtype is None:
            return round_mantissa(x, self.mantissa_bits)
        return x.to(self.dtype).float()


FORMATS: dict[str, FloatFormat] = {
    f.name: f
    for f in (
        FloatFormat("fp32", 8, 23, torch.float32),
        FloatFormat("tf32", 8, 10, None),
        FloatFormat("bf16", 8, 7, torch.bfloat16),
        FloatFormat("fp16", 5, 10, torch.float16),
        FloatFormat("fp8_e4m3", 4, 3, E4M3, finite_only=True),
        FloatFormat("fp8_e5m2", 5, 2, E5M2),
    )
}


def _format(fmt: FloatFormat | str) -> FloatFormat:
    if isinstance(fmt, FloatFormat):
        return fmt
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {list(FORMATS)} or a FloatFormat")
    return FORMATS[fmt]


def round_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round float32 x to `bits` mantissa bits (round to nearest, ties to even), keeping fp32's exponent.

    bits=10 is TF32 and bits=7 is bf16. Works on the integer bit pattern: adding half an ulp of the target
    (minus one, plus the kept lowest bit for ties-to-even) and clearing the dropped bits rounds correctly,
    a carry into the exponent included. inf and NaN pass through unchanged.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"round_mantissa works on float32 bit patterns, got {x.dtype}; pass x.float()")
    if not 0 <= bits <= 23:
        raise ValueError(f"float32 has 23 mantissa bits; bits must be in [0, 23], got {bits}")
    drop = 23 - bits
    if drop == 0:
        return x.clone()
    finite = torch.isfinite(x)
    pattern = x.view(torch.int32)
    sign = pattern & torch.iinfo(torch.int32).min
    # Round the magnitude bits; inf/NaN patterns are zeroed first so the addition cannot overflow int32.
    magnitude = torch.where(finite, pattern & 0x7FFFFFFF, 0)
    kept_lsb = (magnitude >> drop) & 1
    rounded = (magnitude + ((1 << (drop - 1)) - 1) + kept_lsb) & ~((1 << drop) - 1)
    return torch.where(finite, (rounded | sign).view(torch.float32), x)


@dataclass(frozen=True)
class CastReport:
    """What casting a tensor to a format does to it.

    Fractions are of all elements; the relative errors are over the elements that survive the cast
    (nonzero before and after, finite after).
    """

    format: str
    n: int
    underflow: float  # nonzero values that became 0
    subnormal: float  # nonzero values that landed below smallest_normal: few significant bits left
    overflow: float  # finite values that became inf or NaN
    median_rel_error: float
    max_rel_error: float

    def __str__(self) -> str:
        return (
            f"{self.format}: underflow {self.underflow:.1%}, subnormal {self.subnormal:.1%}, "
            f"overflow {self.overflow:.1%}, relative error median {self.median_rel_error:.1e} "
            f"max {self.max_rel_error:.1e} (n={self.n})"
        )


def cast_error(x: torch.Tensor, fmt: FloatFormat | str) -> CastReport:
    """Cast x to `fmt` and measure underflow, subnormals, overflow and relative error against x in float64."""
    fmt = _format(fmt)
    if not x.is_floating_point():
        raise TypeError(f"cast_error needs a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError("cast_error needs a non-empty tensor")
    exact = x.detach().double().flatten()
    cast = fmt.round(x.detach().flatten()).double()
    finite, nonzero = torch.isfinite(exact), exact != 0
    underflow = nonzero & (cast == 0)
    overflow = finite & ~torch.isfinite(cast)
    subnormal = nonzero & (cast != 0) & (cast.abs() < fmt.smallest_normal)
    survived = nonzero & finite & (cast != 0) & torch.isfinite(cast)
    rel = ((cast - exact).abs() / exact.abs())[survived]
    n = exact.numel()
    return CastReport(
        format=fmt.name,
        n=n,
        underflow=underflow.sum().item() / n,
        subnormal=subnormal.sum().item() / n,
        overflow=overflow.sum().item() / n,
        median_rel_error=rel.median().item() if rel.numel() else math.nan,
        max_rel_error=rel.max().item() if rel.numel() else math.nan,
    )


# ----------------------------------------------------------------------------------------------------
# Autocast and the precision policy
# ----------------------------------------------------------------------------------------------------


def _device_type(device: torch.device | str | torch.Tensor) -> str:
    if isinstance(device, torch.Tensor):
        return device.device.type
    return torch.device(device).type


def default_half_dtype(device: torch.device | str | torch.Tensor) -> torch.dtype:
    """bf16 where the device does it natively (CPUs, NVIDIA since Ampere), else fp16 (e.g. a T4, a V100).

    bf16 has fp32's exponent range, so it needs no loss scaling; fp16 does.
    """
    if _device_type(device) == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16
    return torch.bfloat16


def autocast(
    device: torch.device | str | torch.Tensor, dtype: torch.dtype | None = None, enabled: bool = True
) -> torch.autocast:
    """torch.autocast for the device's type ("cuda", "cpu", ...), dtype defaulting to default_half_dtype.

    Inside, matmuls and convolutions run in the low-precision dtype while reductions, softmax and losses stay
    in fp32 (PyTorch's per-op lists); weights stay fp32 and are cast on the fly.
    """
    dtype = default_half_dtype(device) if dtype is None else dtype
    return torch.autocast(_device_type(device), dtype=dtype, enabled=enabled)


@contextlib.contextmanager
def tf32(enabled: bool = True) -> Iterator[None]:
    """Allow (or forbid) TF32 tensor cores for fp32 matmuls and convolutions inside the block; restore after.

    TF32 keeps fp32's range with a 10-bit mantissa (about 3 decimal digits). On an H100 or H200 the datasheet
    peak is 494.7 dense TFLOP/s against 66.9 for fp32 FMAs on CUDA cores. PyTorch leaves it off for matmuls by
    default and on for cuDNN convolutions.
    """
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn


@dataclass(frozen=True)
class Precision:
    """How a training step uses floating point.

    param_dtype: the dtype of the weights, gradients and optimizer state ("pure" low precision when not fp32).
    autocast_dtype: the dtype autocast runs matmuls in (None: no autocast).
    allow_tf32: let fp32 matmuls use TF32 tensor cores, in forward, backward and the optimizer step alike.
    """

    name: str
    param_dtype: torch.dtype = torch.float32
    autocast_dtype: torch.dtype | None = None
    allow_tf32: bool = False

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 autocast: gradients below 2**-24 would flush to zero without loss scaling.

        Pure fp16 needs it too but cannot have it: GradScaler unscales into fp32 gradients and refuses fp16
        ones; that is one reason why fp16 training keeps fp32 master weights.
        """
        return self.autocast_dtype == torch.float16

    def autocast(self, device: torch.device | str | torch.Tensor) -> contextlib.AbstractContextManager:
        """The autocast context of this policy on `device` (a no-op context without autocast)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(_device_type(device), dtype=self.autocast_dtype)

    def grad_scaler(self, device: torch.device | str | torch.Tensor) -> torch.amp.GradScaler:
        """A torch.amp.GradScaler, enabled only where the policy needs one. Create it once per run."""
        return torch.amp.GradScaler(_device_type(device), enabled=self.needs_grad_scaler)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Cast the model's floating-point parameters and buffers to param_dtype (in place); return it."""
        return model.to(self.param_dtype)


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32"),
        Precision("tf32", allow_tf32=True),
        Precision("bf16", autocast_dtype=torch.bfloat16),
        Precision("fp16", autocast_dtype=torch.float16),
        Precision("pure-bf16", param_dtype=torch.bfloat16),
        Precision("pure-fp16", param_dtype=torch.float16),
    )
}


def precision(name: str | Precision) -> Precision:
    """Look up a policy by name: fp32, tf32, bf16 / fp16 (autocast, fp32 weights), pure-bf16 / pure-fp16."""
    if isinstance(name, Precision):
        return name
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; use one of {list(PRECISIONS)}")
    return PRECISIONS[name]


def train_step(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    policy: Precision | str = "fp32",
    *,
    scaler: torch.amp.GradScaler | None = None,
    max_grad_norm: float | None = None,
) -> torch.Tensor:
    """One optimizer step under a precision policy; returns the loss, detached and still on the device.

    The order is the one GradScaler documents: scaled backward, unscale_ (only if clipping needs the true
    gradients), clip, scaler.step (skipped when a gradient is inf/NaN), scaler.update.
    The loss is not moved to the host: `.item()` is a host-device sync, so call it only when you log.
    """
    policy = precision(policy)
    if policy.needs_grad_scaler and (scaler is None or not scaler.is_enabled()):
        raise ValueError(
            f"precision {policy.name!r} runs the backward pass in fp16 and needs loss scaling: create "
            "scaler = policy.grad_scaler(device) once, before the loop (its scale adapts over steps), "
            "and pass scaler=scaler"
        )
    param = next(model.parameters(), None)
    if param is not None and param.dtype != policy.param_dtype:
        raise ValueError(
            f"precision {policy.name!r} keeps weights in {policy.param_dtype}, but the model's are "
            f"{param.dtype}: call policy.prepare(model) before creating the optimizer"
        )
    if policy.param_dtype != torch.float32 and inputs.is_floating_point():
        inputs = inputs.to(policy.param_dtype)
    optimizer.zero_grad(set_to_none=True)
    # The TF32 setting covers the whole step: backward does two thirds of the matmul FLOPs (dX and dW), and
    # the optimizer may run matmuls too. Autocast covers the forward only, as PyTorch recommends: backward
    # ops run in the dtype their forward ops chose.
    with tf32(policy.allow_tf32):
        with policy.autocast(inputs):
            loss = loss_fn(model(inputs), targets)
        if scaler is None:
            loss.backward()
            if max_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            if max_grad_norm is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
    return loss.detach()


# ----------------------------------------------------------------------------------------------------
# fp8
# ----------------------------------------------------------------------------------------------------


class Fp8UnsupportedError(EffdlError, RuntimeError):
    """fp8 tensor-core matmuls need an NVIDIA GPU with compute capability 8.9 or newer."""


def fp8_supported(device: torch.device | str | None = None) -> bool:
    """True on a CUDA GPU with fp8 tensor cores: compute capability >= 8.9 (Ada: L4, RTX 4090; Hopper: H100)."""
    if not torch.cuda.is_available():
        return False
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def to_fp8(
    x: torch.Tensor, dtype: torch.dtype = E4M3, *, dim: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x to fp8 with one scale for the whole tensor (dim=None) or one per slice along `dim`.

    x ~ data.float() * scale. The scale maps the largest magnitude it covers onto the format's max, so the full
    range is used and nothing overflows; the cost is that one outlier pushes every other value it shares a
    scale with towards the subnormals. dim=-1 on a matrix (M, K) gives one scale per row, (M, 1): an outlier
    then costs only its own row (the row-wise scaling of torch._scaled_mm).
    Returns (data in `dtype`, float32 scale on x's device: 0-dim, or x's shape with `dim` kept as size 1).
    Computing amax reads x once.
    """
    if dtype not in (E4M3, E5M2):
        raise ValueError(f"fp8 dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}")
    fmax = torch.finfo(dtype).max
    magnitude = x.detach().abs()
    amax = (magnitude.amax() if dim is None else magnitude.amax(dim=dim, keepdim=True)).float()
    # An all-zero tensor (or row) has amax 0: any scale works, 1 avoids a division by zero.
    scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
    # Clamp: rounding can push amax/scale a hair above fmax, and e4m3 turns anything beyond 448 into NaN.
    data = (x.float() / scale).clamp(-fmax, fmax).to(dtype)
    return data, scale


def _check_fp8_device(t: torch.Tensor) -> None:
    if not fp8_supported(t.device):
        where = (
            f"{torch.cuda.get_device_name(t.device)} (sm_{''.join(map(str, torch.cuda.get_device_capability(t.device)))})"
            if t.device.type == "cuda"
            else str(t.device)
        )
        raise Fp8UnsupportedError(
            f"fp8 matmuls run on the tensor cores of NVIDIA GPUs with compute capability >= 8.9 "
            f"(L4, RTX 4090, H100, H200); these tensors are on {where}. Run on such a GPU, or study fp8 "
            "numerics without one: data, scale = to_fp8(x); x_approx = data.float() * scale."
        )


def _check_scales(
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    m: int,
    n: int,
    a_dtype: torch.dtype,
    b_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> None:
    """Refuse scales that are neither per-tensor nor row-wise ((M, 1) and (1, N)) float32 tensors."""
    for name, s in (("scale_a", scale_a), ("scale_b", scale_b)):
        if s.dtype != torch.float32:
            raise ValueError(f"{name} must be a float32 tensor, got {s.dtype}")
    if scale_a.numel() == 1 and scale_b.numel() == 1:
        return
    if tuple(scale_a.shape) != (m, 1) or tuple(scale_b.shape) != (1, n):
        raise ValueError(
            f"scales must be per-tensor (one element each) or row-wise, scale_a ({m}, 1) and scale_b "
            f"(1, {n}); got scale_a {tuple(scale_a.shape)} and scale_b {tuple(scale_b.shape)}"
        )
    if (a_dtype, b_dtype) != (E4M3, E4M3) or out_dtype != torch.bfloat16:
        raise ValueError(
            f"row-wise scaled fp8 GEMMs take e4m3 operands and write bf16, got a {a_dtype}, b {b_dtype}, "
            f"out_dtype {out_dtype}: use e4m3 and out_dtype=torch.bfloat16, or per-tensor scales"
        )


def scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    use_fast_accum: bool = False,
) -> torch.Tensor:
    """(a * scale_a) @ (b * scale_b) on fp8 tensor cores: torch._scaled_mm with its requirements checked.

    a: (M, K) fp8, row-major; b: (K, N) fp8, column-major (b = b_rowmajor.t().contiguous().t());
    K and N multiples of 16 (M may be anything, 1 included: torch's own check, _check_scaled_mm_sizes).
    Scales are float32 dequantization scales, as from to_fp8: either one per tensor (one element each), or
    row-wise, scale_a (M, 1) for a's rows and scale_b (1, N) for b's columns, both e4m3 and out_dtype bf16
    (what torch 2.11's row-wise GEMM supports).
    use_fast_accum: cuBLAS's faster fp8 mode that accumulates in lower precision (the usual choice for
    forward passes, not for gradients).
    """
    for name, t in (("a", a), ("b", b)):
        if t.dtype not in (E4M3, E5M2):
            raise TypeError(f"{name} must be fp8 (float8_e4m3fn or float8_e5m2), got {t.dtype}; use to_fp8")
        if t.dim() != 2:
            raise ValueError(f"{name} must be a matrix, got shape {tuple(t.shape)}")
    if a.dtype == E5M2 and b.dtype == E5M2:
        raise TypeError("at most one operand may be e5m2 (cuBLAS has no e5m2 x e5m2 GEMM); make a or b e4m3")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"inner dimensions differ: a is {tuple(a.shape)}, b is {tuple(b.shape)}")
    (m, k), n = a.shape, b.shape[1]
    if k % 16 or n % 16:
        raise ValueError(f"fp8 GEMM needs K and N to be multiples of 16, got K={k}, N={n}: pad the matrices")
    if a.stride(1) != 1:
        raise ValueError(
            f"a must be row-major (stride(1) == 1), got strides {a.stride()}: pass a.contiguous()"
        )
    if b.stride(0) != 1:
        raise ValueError(
            f"b must be column-major (stride(0) == 1), got strides {b.stride()}: pass b.t().contiguous().t()"
        )
    _check_scales(scale_a, scale_b, m, n, a.dtype, b.dtype, out_dtype)
    # Last, so that the checks above can be tried on any machine. Skipped while torch.compile traces (an fp8
    # layer compiled into a decoder): it is a host-side query of the device, there only to turn
    # torch._scaled_mm's own refusal of a GPU without fp8 tensor cores into a clearer message.
    if not torch.compiler.is_compiling():
        _check_fp8_device(a)
    return torch._scaled_mm(
        a,
        b,
        scale_a=scale_a.contiguous(),  # the row-wise GEMM reads its scales contiguously
        scale_b=scale_b.contiguous(),
        out_dtype=out_dtype,
        use_fast_accum=use_fast_accum,
    )


def fp8_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    a_dtype: torch.dtype = E4M3,
    b_dtype: torch.dtype = E4M3,
    out_dtype: torch.dtype | None = None,
    use_fast_accum: bool = False,
) -> torch.Tensor:
    """a @ b with both operands quantized to fp8, one scale per tensor (see to_fp8 and scaled_mm).

    a_dtype, b_dtype: e4m3 for weights and activations; e5m2 (more range) for a gradient operand. At most
    one may be e5m2.
    out_dtype defaults to a's dtype where cuBLAS can write it (bf16, fp16, fp32), else bf16.
    The quantization reads and writes both operands once more than a bf16 matmul would: worth it for large
    GEMMs, where the 2x faster tensor cores dominate.
    """
    if out_dtype is None:
        out_dtype = a.dtype if a.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
    _check_fp8_device(a)
    a8, scale_a = to_fp8(a, a_dtype)
    b8, scale_b = to_fp8(b, b_dtype)
    return scaled_mm(
        a8.contiguous(),
        b8.t().contiguous().t(),
        scale_a,
        scale_b,
        out_dtype=out_dtype,
        use_fast_accum=use_fast_accum,
    )
