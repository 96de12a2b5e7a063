"""Quantization for inference: fewer bits per weight (and activation), and what each format costs in error.

    model = quantize_linears(model, "int8")                  # weight-only int8, one scale per output channel
    model = quantize_linears(model, "int4", group_size=128)  # weight-only int4, two codes per byte
    model = quantize_linears(model, "fp8-row")               # e4m3 weights and activations, torch._scaled_mm
    model = quantize_linears(model, "smoothquant", calibration=tokens, alpha=0.5)   # W8A8, fake-quantized
    tokens = generate(model, prompt, 32)                     # common.inference.generate, unchanged

Decoding one sequence at a time is bound by memory: each step reads every weight once to multiply it by
one vector. Halving the bytes per weight is what makes it faster, provided the matmul reads the small
weights themselves and never writes a dequantized copy. Each quantizer's docstring says how far a restored
value can be from the original: half a step of its grid.

- int8, weight-only: q = round(w / s), s = max|w_row| / 127 per output row, and
  y = (x @ q^T) * s: the scale applies to the output, so the matmul takes the int8 weights converted to
  x's dtype. Eager, that conversion writes a full bf16 copy (per weight: 1 byte read, 2 written, 2 read
  again by the matmul, 2.5 times a bf16 matmul's traffic).
  On a GPU, up to MAX_DECODE_ROWS token rows (decoding) run common.kernels.int8_matmul instead: a
  Triton kernel, registered as a PyTorch operator, that converts each weight in registers as it loads it,
  so the step reads 1 byte per weight. Before it, the decode path relied on Inductor (compiled at batch 1
  inside `fused_dequantization()`) to turn the product into such a reduction; inside a whole model Inductor
  also fused the preceding norm or activation into those reductions, each program recomputing it, and on
  an H100 the int8 step read its weights at 0.96 TB/s against bf16's 1.48 (1.16x the tokens/s, in the
  run of `effdl bench quantization` that preceded the kernel and the benchmark's move to Llama-3-8B's
  shape). The alternative, torch._weight_int8pack_mm, has a CUDA kernel (aten/src/ATen/native/cuda/
  int8mm.cu) that gives each output to one thread walking all of K, so a warp's weight loads are a row
  apart, not coalesced: not the kernel to show a bandwidth gain with.
- int4, weight-only, groups of `group_size` weights along the input dimension, asymmetric:
  w ~ code * s + m with code in 0..15, m the group's minimum and s = (max - min) / 15. Asymmetric because
  16 levels are few: over [min, max] the step is (max - min) / 15, while a symmetric grid must cover
  [-max|w|, max|w|] with 15 usable levels (step 2 max|w| / 15 or worse), and a group of 128 weights is
  rarely centred on 0. The cost is one float offset per group beside the scale. Two codes per uint8 byte.
  The matmul unpacks, dequantizes and calls F.linear: eager, through a full-size float copy; compiled at
  batch 1 inside `fused_dequantization()`, Inductor may fold the unpacking into the matmul's loads as it
  does int8's conversion (the benchmark measures what it gets). A dedicated int4 GEMM (tinygemm's
  torch._weight_int4pack_mm, with its own tile layout) is not used here.
- fp8 e4m3 with a scale per tensor or per row (weights per output row, activations per token, computed at
  run time), through torch._scaled_mm (common.amp.scaled_mm; sm_89+ GPUs only).
- SmoothQuant (Xiao et al., 2023): activations have a few channels with huge values, so a per-token int8
  scale set by them leaves the others a handful of levels. Dividing channel j by
  s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) and multiplying weight column j by s_j leaves X W^T unchanged
  in exact arithmetic and moves the difficulty from the activations to the weights. W8A8 here is fake
  quantization: quantize and dequantize in float, then a float matmul, to measure the error; the int8
  GEMM and the row-quantization kernel that make it fast are the week-9 assignment.

quantize_linears swaps the nn.Linear layers of a model (a common.models.llama.Llama: the projections of
attention and feed-forward) in place; the output projection (lm_head) only with include_output=True, the
embedding never.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from common.amp import E4M3, scaled_mm, to_fp8

__all__ = [
    "METHODS",
    "Fp8Linear",
    "Int4WeightLinear",
    "Int8WeightLinear",
    "Method",
    "SmoothQuantLinear",
    "calibrate_input_absmax",
    "dequantize_int4",
    "dequantize_int8",
    "fake_quantize_int8",
    "fused_dequantization",
    "int8_weight_matmul_reference",
    "linear_names",
    "pack_int4",
    "quantize_int4",
    "quantize_int8",
    "quantize_linears",
    "smoothing_factors",
    "unpack_int4",
]

Method = Literal["int8", "int4", "fp8-tensor", "fp8-row", "smoothquant"]
METHODS: tuple[str, ...] = get_args(Method)
INT8_MAX = 127  # symmetric: -127 ... 127, so that q and -q are both codes (-128 is never used)
INT4_LEVELS = 15  # codes 0 ... 15: 15 steps between a group's minimum and maximum
# Up to this many token rows, Int8WeightLinear on a GPU runs common.kernels.int8_matmul. Each row streams
# the weight again: on an H100, against bf16 cuBLAS on Llama-3-8B's matrices, one row ran at 1.60x to
# 1.70x, two at 1.30x to 1.42x, four at 0.77x to 1.01x (`effdl bench kernels --kernel int8_matmul`).
MAX_DECODE_ROWS = 2


def _check_float(x: torch.Tensor, what: str) -> None:
    if not x.is_floating_point() or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"{what} must be a float tensor (fp32, bf16, fp16, fp64), got {x.dtype}")


# ----------------------------------------------------------------------------------------------------
# int8, symmetric absmax
# ----------------------------------------------------------------------------------------------------


def quantize_int8(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per slice along `dim`: x ~ q * scale, |x - q * scale| <= scale / 2.

    scale = max|x| / 127 over the slice (its largest value maps onto 127), q = round(x / scale).
    For a weight (out, in), dim=-1 gives one scale per output channel; for activations (tokens, d), one per
    token. Returns q int8 and scale float32 of x's shape with `dim` kept as size 1. An all-zero slice gets
    scale 1 (any scale restores zeros exactly).
    """
    _check_float(x, "x")
    amax = x.detach().abs().amax(dim=dim, keepdim=True).float()
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = (x.float() / scale).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * scale in `dtype`; the inverse of quantize_int8 up to its rounding."""
    if q.dtype != torch.int8:
        raise TypeError(f"q must be int8, got {q.dtype}")
    return (q.float() * scale).to(dtype)


def int8_weight_matmul_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(x @ q^T) * scale through a dequantized copy of q in x's dtype: the eager way, and the path of a
    prefill (common.kernels.int8_matmul is the decode kernel that never writes that copy)."""
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)


def fake_quantize_int8(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x rounded to its int8 grid and back (quantize_int8, then dequantize_int8), in x's dtype."""
    return dequantize_int8(*quantize_int8(x, dim), dtype=x.dtype)


# ----------------------------------------------------------------------------------------------------
# int4, grouped and asymmetric, two codes per byte
# ----------------------------------------------------------------------------------------------------


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 (..., n) uint8, n even -> (..., n // 2) uint8: element 2i in the low nibble, 2i+1 in
    the high one."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"int4 codes must be uint8 (values 0..15), got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"two codes share a byte: the last dimension must be even, got {codes.shape[-1]}")
    if codes.numel() and codes.max().item() > 15:  # note: a host sync, once per packing
        raise ValueError(f"int4 codes must be in 0..15, got a maximum of {codes.max().item()}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: (..., n // 2) uint8 -> (..., n) uint8 codes."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed int4 must be uint8, got {packed.dtype}")
    low, high = packed & 0xF, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)  # (..., n // 2, 2) -> (..., n), pairs back in place


def quantize_int4(
    weight: torch.Tensor, group_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of `group_size` consecutive input channels: w ~ code * scale + minimum.

    weight (out, in) -> packed (out, in // 2) uint8, scale and minimum (out, in // group_size) float32.
    In each group scale = (max - min) / 15 and code = round((w - min) / scale) in 0..15, so
    |w - (code * scale + min)| <= scale / 2. A constant group gets scale 1 and is restored exactly.
    """
    _check_float(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be a matrix (out_features, in_features), got shape {tuple(weight.shape)}"
        )
    out_features, in_features = weight.shape
    if group_size < 2 or group_size % 2 or in_features % group_size:
        raise ValueError(
            f"group_size={group_size} must be even and divide in_features={in_features}: pick a divisor, "
            f"e.g. {_divisor_hint(in_features)}"
        )
    groups = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    minimum, maximum = groups.amin(-1), groups.amax(-1)  # (out, n_groups)
    spread = maximum - minimum
    scale = torch.where(spread > 0, spread / INT4_LEVELS, torch.ones_like(spread))
    codes = ((groups - minimum[..., None]) / scale[..., None]).round().clamp(0, INT4_LEVELS)
    return pack_int4(codes.to(torch.uint8).reshape(out_features, in_features)), scale, minimum


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """code * scale + minimum, (out, in) in `dtype`; the group size is in // scale.shape[1]."""
    codes = unpack_int4(packed)  # (out, in)
    out_features, in_features = codes.shape
    if scale.shape != minimum.shape or scale.dim() != 2 or in_features % scale.shape[1]:
        raise ValueError(
            f"scale {tuple(scale.shape)} and minimum {tuple(minimum.shape)} must both be (out, n_groups), "
            f"n_groups dividing in_features={in_features}"
        )
    groups = codes.reshape(out_features, scale.shape[1], -1).float()  # (out, n_groups, group_size)
    return (groups * scale[..., None] + minimum[..., None]).reshape(out_features, in_features).to(dtype)


def _divisor_hint(n: int) -> str:
    divisors = [g for g in (32, 64, 128, 256) if n % g == 0]
    return ", ".join(map(str, divisors)) if divisors else "an even divisor of in_features"


# ----------------------------------------------------------------------------------------------------
# SmoothQuant
# ----------------------------------------------------------------------------------------------------


def smoothing_factors(input_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha) per input channel j: (in,) float32.

    input_absmax (in,): each input channel's largest magnitude over calibration data; weight (out, in).
    X diag(s)^-1 and diag(s) W^T keep the product; alpha = 0.5 splits each channel's range evenly between
    the two (the paper's default), alpha -> 1 puts all of it on the weights. A channel that is zero in the
    activations or in the weights gets s = 1 (nothing to balance).
    """
    _check_float(weight, "weight")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if input_absmax.shape != (weight.shape[1],):
        raise ValueError(
            f"input_absmax has shape {tuple(input_absmax.shape)}, expected ({weight.shape[1]},): one "
            "value per input channel of the weight (out_features, in_features)"
        )
    x_max = input_absmax.detach().float()
    w_max = weight.detach().abs().amax(dim=0).float()
    factors = x_max.pow(alpha) / w_max.pow(1 - alpha)
    return torch.where((x_max > 0) & (w_max > 0), factors, torch.ones_like(factors))


@torch.no_grad()
def calibrate_input_absmax(
    model: nn.Module, batches: Iterable[torch.Tensor], names: Iterable[str]
) -> dict[str, torch.Tensor]:
    """The largest |input| per input channel of each named nn.Linear over model(batch) for every batch."""
    modules = dict(model.named_modules())
    absmax: dict[str, torch.Tensor] = {}
    hooks = []
    for name in names:

        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], name: str = name) -> None:
            channel_max = inputs[0].detach().abs().flatten(0, -2).amax(dim=0).float()  # (in,)
            absmax[name] = channel_max if name not in absmax else torch.maximum(absmax[name], channel_max)

        hooks.append(modules[name].register_forward_pre_hook(record))
    try:
        for batch in batches:
            model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    if not absmax:
        raise ValueError("no calibration batch was given: pass at least one batch of tokens")
    return absmax


# ----------------------------------------------------------------------------------------------------
# Replacements for nn.Linear
# ----------------------------------------------------------------------------------------------------


class QuantizedLinear(nn.Module):
    """What the replacements share: the sizes, an optional bias, and flattening x to (tokens, in)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"x has {x.shape[-1]} features in its last dimension, this layer takes {self.in_features}"
            )
        y = self.matmul(x.reshape(-1, self.in_features))  # (..., in) -> (tokens, in) -> (tokens, out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (tokens, in) @ W^T -> (tokens, out) in x's dtype: what each format defines."""
        raise NotImplementedError(f"{type(self).__name__} must define matmul")

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


class Int8WeightLinear(QuantizedLinear):
    """nn.Linear with int8 weights, one scale per output channel; activations stay in their float dtype.

    On a GPU, up to MAX_DECODE_ROWS token rows (decoding) go through common.kernels.int8_matmul, which
    reads the int8 weights as they are; more rows, or a CPU, dequantize first (module docstring).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        q, scale = quantize_int8(linear.weight, dim=-1)  # (out, in) int8, (out, 1)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale.squeeze(1).to(linear.weight.dtype))  # (out,), the layer's dtype

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.numel() <= MAX_DECODE_ROWS * x.shape[-1]:  # a decode step: read the int8 bytes
            # Imported here: importing common.kernels on a machine without a GPU switches on Triton's
            # interpreter, which a model that never runs the kernel should not do.
            from common.kernels.int8_matmul import int8_weight_matmul

            return int8_weight_matmul(x, self.weight, self.scale)
        # A prefill, whose time is the arithmetic, or a CPU: through a dequantized weight.
        return int8_weight_matmul_reference(x, self.weight, self.scale)


class Int4WeightLinear(QuantizedLinear):
    """nn.Linear with grouped asymmetric int4 weights, two per byte (quantize_int4); dequantized per call."""

    def __init__(self, linear: nn.Linear, group_size: int = 128) -> None:
        super().__init__(linear)
        packed, scale, minimum = quantize_int4(linear.weight, group_size)
        self.group_size = group_size
        self.register_buffer("weight", packed)  # (out, in // 2) uint8
        self.register_buffer("scale", scale)  # (out, in // group_size) float32
        self.register_buffer("minimum", minimum)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize_int4(self.weight, self.scale, self.minimum, x.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


class Fp8Linear(QuantizedLinear):
    """nn.Linear as an e4m3 GEMM (torch._scaled_mm): weights quantized once, activations at every call.

    granularity "tensor": one scale for the weight and one for the activations; "row": one per output
    channel and one per token, so an outlier costs only its own row (and the output must be bf16).
    Runs on GPUs with fp8 tensor cores (compute capability >= 8.9); elsewhere common.amp says so.
    """

    def __init__(self, linear: nn.Linear, granularity: Literal["tensor", "row"] = "row") -> None:
        super().__init__(linear)
        if granularity not in ("tensor", "row"):
            raise ValueError(f"granularity must be 'tensor' or 'row', got {granularity!r}")
        self.granularity = granularity
        dim = -1 if granularity == "row" else None
        weight, scale = to_fp8(linear.weight, E4M3, dim=dim)  # (out, in) e4m3; () or (out, 1)
        self.register_buffer("weight", weight)
        # _scaled_mm computes x @ W^T: W^T's columns are W's rows, so the row scales go in as (1, out).
        self.register_buffer("scale", scale if granularity == "tensor" else scale.t().contiguous())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        x8, x_scale = to_fp8(x, E4M3, dim=-1 if self.granularity == "row" else None)  # per token: (tokens, 1)
        # weight (out, in) row-major is W^T (in, out) column-major, as the GEMM wants its second operand
        return scaled_mm(x8, self.weight.t(), x_scale, self.scale, out_dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, granularity={self.granularity}"


class SmoothQuantLinear(QuantizedLinear):
    """W8A8 by fake quantization after SmoothQuant's migration: int8 per token times int8 per output channel.

    y = fq(x / s) @ fq(W diag(s))^T, fq = quantize then dequantize (fake_quantize_int8), in float32.
    The division by s would be folded into the preceding RMSNorm's weight in a deployment; here it stays
    explicit so that the layer replaces any nn.Linear.
    """

    def __init__(self, linear: nn.Linear, input_absmax: torch.Tensor, alpha: float = 0.5) -> None:
        super().__init__(linear)
        smooth = smoothing_factors(input_absmax.to(linear.weight.device), linear.weight, alpha)
        q, scale = quantize_int8(linear.weight.detach().float() * smooth, dim=-1)
        self.alpha = alpha
        self.register_buffer("smooth", smooth)  # (in,) float32
        self.register_buffer("weight", q)  # (out, in) int8 of W diag(s)
        self.register_buffer("scale", scale)  # (out, 1) float32

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        x_q = fake_quantize_int8(x.float() / self.smooth, dim=-1)  # per token
        return F.linear(x_q, dequantize_int8(self.weight, self.scale)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}"


def fused_dequantization() -> contextlib.AbstractContextManager:
    """Compile inside this for batch-1 decoding: Inductor turns each (1, K) @ (K, N) matmul into a reduction
    that converts quantized weights as it loads them (and tunes its launch parameters, which takes longer).

    It sets torch._inductor.config.coordinate_descent_tuning, which Inductor reads when it compiles: the
    first call of a compiled function (torch.compile is lazy) must happen inside.
    """
    import torch._inductor.config  # here, not at the top: a model that is never compiled does not need it

    return torch._inductor.config.patch(coordinate_descent_tuning=True)


# ----------------------------------------------------------------------------------------------------
# Swapping them into a model
# ----------------------------------------------------------------------------------------------------


def linear_names(model: nn.Module, include_output: bool = False) -> list[str]:
    """The names of model's nn.Linear modules that quantize_linears replaces (by default all but `output`)."""
    return [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and (include_output or name != "output")
    ]


@torch.no_grad()
def quantize_linears(
    model: nn.Module,
    method: Method,
    *,
    group_size: int = 128,
    alpha: float = 0.5,
    calibration: Iterable[torch.Tensor] | None = None,
    include_output: bool = False,
) -> nn.Module:
    """Replace model's nn.Linear layers, in place, by their `method` counterparts; return the model.

    method: "int8" (Int8WeightLinear), "int4" (Int4WeightLinear, `group_size`), "fp8-tensor" / "fp8-row"
    (Fp8Linear), "smoothquant" (SmoothQuantLinear, `alpha`, with `calibration`: batches of inputs of model,
    run once to record each layer's input range). The output projection (`output`, the lm_head) is kept in
    float unless include_output=True: its errors reach the logits directly, and it is one layer of many.
    """
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    if method != "smoothquant" and calibration is not None:
        raise ValueError(f"calibration data is used by smoothquant only, not by {method!r}")
    names = linear_names(model, include_output)
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to quantize")
    if method == "smoothquant":
        if calibration is None:
            raise ValueError(
                "smoothquant needs calibration batches (calibration=[tokens, ...]) to set its scales"
            )
        input_absmax = calibrate_input_absmax(model, calibration, names)
    modules = dict(model.named_modules())
    replacements: dict[str, nn.Module] = {}
    # Every replacement is built first, so that a layer that cannot be quantized leaves the model as it was.
    for name in names:
        linear = modules[name]
        if method == "int8":
            replacements[name] = Int8WeightLinear(linear)
        elif method == "int4":
            replacements[name] = Int4WeightLinear(linear, group_size)
        elif method in ("fp8-tensor", "fp8-row"):
            replacements[name] = Fp8Linear(linear, "tensor" if method == "fp8-tensor" else "row")
        else:
            replacements[name] = SmoothQuantLinear(linear, input_absmax[name], alpha)
    for name, replacement in replacements.items():
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, replacement)
    return model
