"""What the hardware can do: device detection, a GPU spec table and the roofline model.

A timing means little until it is set against what the chip could do. This module holds vendor datasheet
numbers (peak FLOP/s per dtype, memory bandwidth, L2 size) for the GPUs the course runs on, finds the
entry for the GPU at hand, and draws the roofline: attainable FLOP/s = min(peak, intensity x bandwidth).

    >>> spec = SPECS["H100 SXM"]
    >>> round(ridge_point(spec, "bf16"))   # FLOP per byte needed to stop being memory-bound
    295

All peaks are *dense* (no 2:4 sparsity): NVIDIA's datasheets print the sparse figure, twice as large, with
an asterisk. Tensor-core peaks assume FP32 accumulation, which is what PyTorch uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from common.errors import EffdlError

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "DTYPES",
    "GPUSpec",
    "NoGPUError",
    "SPECS",
    "UnknownGPUError",
    "attainable_flops",
    "default_device",
    "dtype_key",
    "gpu_spec",
    "peak_flops",
    "plot_roofline",
    "ridge_point",
    "spec_from_name",
]

# The dtype keys of GPUSpec.peak_flops, from widest to narrowest.
DTYPES = ("fp64", "fp32", "tf32", "bf16", "fp16", "fp8", "int8")

MiB, GiB = 2**20, 2**30
TERA = 1e12


class NoGPUError(EffdlError, RuntimeError):
    """A CUDA GPU was needed, but torch.cuda.is_available() is False."""


class UnknownGPUError(EffdlError, LookupError):
    """The GPU is not in SPECS, so its peaks are unknown."""


@dataclass(frozen=True)
class GPUSpec:
    """Datasheet numbers of one GPU model.

    peak_flops maps a dtype key (see DTYPES) to dense FLOP/s (ops/s for int8); a key is absent where the
    hardware has no fast path for that dtype (e.g. bf16 on a T4).
    """

    name: str
    peak_flops: dict[str, float]
    mem_bandwidth: float  # bytes/s, DRAM (HBM or GDDR), vendor datasheet
    memory_bytes: int
    l2_bytes: int
    sm_count: int

    def __post_init__(self) -> None:
        unknown = set(self.peak_flops) - set(DTYPES)
        if unknown:
            raise ValueError(f"GPUSpec {self.name!r}: unknown dtype keys {sorted(unknown)}; use {DTYPES}")
        if self.mem_bandwidth <= 0 or any(v <= 0 for v in self.peak_flops.values()):
            raise ValueError(f"GPUSpec {self.name!r}: peaks and bandwidth must be positive")


# Datasheet numbers, dense. Each entry names its source; the numbers were checked against it. Notes:
# - Datasheets print tensor-core figures "with sparsity" (2:4), twice the dense rate: we halve them.
# - fp64 on A100/H100/H200 is the FP64 tensor-core figure (what cuBLAS DGEMM reaches), twice the
#   vector rate. On L4/T4/RTX 4090 fp64 is not on the datasheet: it is the architectural 1/64 (Ada) or
#   1/32 (Turing) of the fp32 rate, kept so a roofline shows how slow fp64 is there.
# - fp32 is the CUDA-core rate; tf32 is what an fp32 matmul gets with TF32 allowed
#   (torch.set_float32_matmul_precision("high")).
# - A peak is FLOPs per clock x SMs x an assumed clock, e.g. H100 SXM bf16: 4096 dense FLOP per clock per
#   SM x 132 SMs x 1.83 GHz = 989.4 TFLOP/s. A GPU that runs at a lower clock (power or thermal limit) has
#   a proportionally lower reachable peak.
# - RTX 4090 tensor-core figures are those with FP32 accumulation: GeForce parts run FP16-accumulate
#   at twice that rate, but PyTorch accumulates in FP32.
# - "GB" of GPU memory on datasheets are binary (80 GB = 80 GiB); bandwidths are decimal (TB/s = 1e12 B/s).
# NVIDIA H100 Tensor Core GPU Architecture whitepaper, H100 SXM5 column (dense), shared by the H200 SXM.
HOPPER_SXM_PEAKS = {
    "fp64": 66.9e12,
    "fp32": 66.9e12,
    "tf32": 494.7e12,
    "bf16": 989.4e12,
    "fp16": 989.4e12,
    "fp8": 1978.9e12,
    "int8": 1978.9e12,
}

SPECS: dict[str, GPUSpec] = {
    # NVIDIA H100 Tensor Core GPU Architecture whitepaper, H100 SXM5 column: FP64 tensor 66.9, FP32 66.9,
    # TF32 494.7, FP16/BF16 989.4, FP8 1978.9 TFLOP/s, INT8 1978.9 TOPS (dense); 132 SMs, 50 MB L2.
    # H100 datasheet, SXM column: 80 GB HBM3 at 3.35 TB/s (it rounds the same peaks: 67, 989, 1979).
    "H100 SXM": GPUSpec(
        name="H100 SXM",
        peak_flops=dict(HOPPER_SXM_PEAKS),
        mem_bandwidth=3.35e12,
        memory_bytes=80 * GiB,
        l2_bytes=50 * MiB,
        sm_count=132,
    ),
    # H100 datasheet, PCIe column: FP64 tensor 51, FP32 51, TF32 756*, BF16/FP16 1513*, FP8/INT8 3026*
    # (* sparse, halved here); 80 GB HBM2e at 2.0 TB/s. 114 SMs and 50 MB L2: H100 whitepaper.
    "H100 PCIe": GPUSpec(
        name="H100 PCIe",
        peak_flops={
            "fp64": 51e12,
            "fp32": 51e12,
            "tf32": 378e12,
            "bf16": 756.5e12,
            "fp16": 756.5e12,
            "fp8": 1513e12,
            "int8": 1513e12,
        },
        mem_bandwidth=2.0e12,
        memory_bytes=80 * GiB,
        l2_bytes=50 * MiB,
        sm_count=114,
    ),
    # H200 SXM (torch and nvidia-smi call it "NVIDIA H200"). H200 datasheet, SXM column: the H100 SXM's
    # compute (FP64 tensor 67, FP32 67, TF32 989*, BF16/FP16 1979*, FP8/INT8 3958*, * sparse), so the
    # whitepaper's unrounded H100 SXM figures are used; 141 GB HBM3e at 4.8 TB/s. 132 SMs (same GH100
    # configuration). L2 is not on the datasheet: with all six memory stacks enabled the die's full 60 MB
    # (the H100 SXM enables five: 50 MB); tests/test_hardware.py checks it against the device on a GPU run.
    "H200": GPUSpec(
        name="H200",
        peak_flops=dict(HOPPER_SXM_PEAKS),
        mem_bandwidth=4.8e12,
        memory_bytes=141 * GiB,
        l2_bytes=60 * MiB,
        sm_count=132,
    ),
    # A100 40GB: NVIDIA A100 datasheet (the SXM4 and PCIe 40GB parts share these numbers): FP64 tensor
    # 19.5, FP32 19.5, TF32 156, BF16/FP16 312 TFLOP/s, INT8 624 TOPS (dense); 1,555 GB/s. 108 SMs and
    # 40 MB L2: NVIDIA A100 Tensor Core GPU Architecture whitepaper.
    "A100 40GB": GPUSpec(
        name="A100 40GB",
        peak_flops={
            "fp64": 19.5e12,
            "fp32": 19.5e12,
            "tf32": 156e12,
            "bf16": 312e12,
            "fp16": 312e12,
            "int8": 624e12,
        },
        mem_bandwidth=1.555e12,
        memory_bytes=40 * GiB,
        l2_bytes=40 * MiB,
        sm_count=108,
    ),
    # A100 80GB SXM4: A100 datasheet, "A100 80GB SXM" column: compute as the 40GB part, 2,039 GB/s. (The 80GB
    # PCIe part has 1.935 TB/s and is deliberately not matched to this entry.)
    "A100 80GB": GPUSpec(
        name="A100 80GB",
        peak_flops={
            "fp64": 19.5e12,
            "fp32": 19.5e12,
            "tf32": 156e12,
            "bf16": 312e12,
            "fp16": 312e12,
            "int8": 624e12,
        },
        mem_bandwidth=2.039e12,
        memory_bytes=80 * GiB,
        l2_bytes=40 * MiB,
        sm_count=108,
    ),
    # NVIDIA L4 datasheet: FP32 30.3, TF32 120*, BF16/FP16 242*, FP8 485*, INT8 485* (* sparse, halved
    # here); 24 GB GDDR6 at 300 GB/s. 58 SMs and 48 MB L2 (AD104): NVIDIA Ada GPU architecture whitepaper.
    "L4": GPUSpec(
        name="L4",
        peak_flops={
            "fp64": 30.3e12 / 64,
            "fp32": 30.3e12,
            "tf32": 60e12,
            "bf16": 121e12,
            "fp16": 121e12,
            "fp8": 242.5e12,
            "int8": 242.5e12,
        },
        mem_bandwidth=300e9,
        memory_bytes=24 * GiB,
        l2_bytes=48 * MiB,
        sm_count=58,
    ),
    # NVIDIA T4 datasheet: FP32 8.1, mixed FP16/FP32 65 TFLOP/s, INT8 130 TOPS; 16 GB GDDR6 at 320 GB/s.
    # 40 SMs and 4 MB L2 (TU104): Turing whitepaper. Turing tensor cores do fp16 and int8 only (no bf16,
    # tf32 or fp8).
    "T4": GPUSpec(
        name="T4",
        peak_flops={
            "fp64": 8.1e12 / 32,
            "fp32": 8.1e12,
            "fp16": 65e12,
            "int8": 130e12,
        },
        mem_bandwidth=320e9,
        memory_bytes=16 * GiB,
        l2_bytes=4 * MiB,
        sm_count=40,
    ),
    # NVIDIA Ada GPU architecture whitepaper, GeForce RTX 4090 column: FP32 82.6, TF32 82.6,
    # FP16/BF16 with FP32 accumulate 165.2, FP8 with FP32 accumulate 330.3 TFLOP/s, INT8 660.6 TOPS
    # (dense); 128 SMs, 72 MB L2, 24 GB GDDR6X at 1,008 GB/s.
    "RTX 4090": GPUSpec(
        name="RTX 4090",
        peak_flops={
            "fp64": 82.6e12 / 64,
            "fp32": 82.6e12,
            "tf32": 82.6e12,
            "bf16": 165.2e12,
            "fp16": 165.2e12,
            "fp8": 330.3e12,
            "int8": 660.6e12,
        },
        mem_bandwidth=1.008e12,
        memory_bytes=24 * GiB,
        l2_bytes=72 * MiB,
        sm_count=128,
    ),
}

# torch.cuda.get_device_name() -> SPECS key. First match wins; patterns are case-insensitive.
# Word boundaries keep look-alikes out: "GH200" is not "H200", "L40S" is not "L4". Variants with other
# clocks or memory (H100 NVL, H200 NVL, A100 80GB PCIe, RTX 4090 D, laptop parts) are left unknown on
# purpose: a wrong peak is worse than none.
NAME_PATTERNS: list[tuple[str, str]] = [
    (r"\bH200\b(?!.*\bNVL\b)", "H200"),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe"),
    (r"\bH100\b(?!.*\bNVL\b).*\b(HBM3|SXM\d?)\b", "H100 SXM"),  # "NVIDIA H100 80GB HBM3"
    (r"\bA100\b.*\bSXM\d?\b.*\b80GB\b", "A100 80GB"),  # "NVIDIA A100-SXM4-80GB"
    (r"\bA100\b.*\b40GB\b", "A100 40GB"),  # "NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB"
    (r"\bL4\b", "L4"),
    (r"\bT4\b", "T4"),
    (r"\bRTX 4090\b(?! D\b)(?!.*\bLaptop\b)", "RTX 4090"),
]


def default_device() -> torch.device:
    """The current CUDA device if there is one, else the CPU (never a hard-coded index)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def benchmark_device(quick: bool, what_it_measures: str) -> torch.device:
    """Where a benchmark runs: the current GPU, or the CPU for a `quick` run (which checks the code, not speed).

    A full run without a GPU raises NoGPUError that says `what_it_measures` and how to run it instead.
    """
    device = default_device()
    if device.type == "cpu" and not quick:
        raise NoGPUError(
            f"{what_it_measures}; torch.cuda.is_available() is False here. "
            "Run it on a GPU machine (or --quick on this one)."
        )
    return device


def spec_from_name(name: str) -> GPUSpec:
    """The spec of the GPU called `name` (as torch.cuda.get_device_name() spells it).

    An exact SPECS key wins, so a spec registered under the device's own name is found first.
    """
    if name in SPECS:
        return SPECS[name]
    for pattern, key in NAME_PATTERNS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return SPECS[key]
    raise UnknownGPUError(
        f"no datasheet numbers for GPU {name!r} (known: {', '.join(SPECS)}). "
        "Pass the peaks explicitly: spec = GPUSpec(name=..., peak_flops={'bf16': ..., 'fp32': ...}, "
        "mem_bandwidth=..., memory_bytes=..., l2_bytes=..., sm_count=...) and give it to "
        "peak_flops(dtype, spec) / ridge_point(spec, dtype) / plot_roofline(ax, spec, dtype); "
        f"or register it for this GPU with common.hardware.SPECS[{name!r}] = spec."
    )


def _cuda_device(device: torch.device | str | int | None) -> torch.device:
    if device is None:
        device = default_device()
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        raise NoGPUError(
            f"no GPU spec for device {str(device)!r}: GPU specs describe CUDA GPUs"
            + ("" if torch.cuda.is_available() else ", and no CUDA GPU is available here")
            + ". Pass a spec explicitly, e.g. SPECS['H100 SXM'], to reason about a GPU you don't have."
        )
    if not torch.cuda.is_available():
        raise NoGPUError(
            "no CUDA GPU is available (torch.cuda.is_available() is False); "
            "pass a spec explicitly, e.g. SPECS['H100 SXM'], to reason about a GPU you don't have."
        )
    return device


def gpu_spec(device: torch.device | str | int | None = None) -> GPUSpec:
    """The spec of a CUDA device (default: the current one).

    Raises NoGPUError without a CUDA GPU, UnknownGPUError for a GPU not in SPECS.
    """
    return spec_from_name(torch.cuda.get_device_name(_cuda_device(device)))


_DTYPE_ALIASES = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int8: "int8",
    "float64": "fp64",
    "double": "fp64",
    "float32": "fp32",
    "float": "fp32",
    "tensorfloat32": "tf32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
}
# Every fp8 flavour runs on the same tensor-core path.
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _DTYPE_ALIASES[getattr(torch, _name)] = "fp8"
        _DTYPE_ALIASES[_name] = "fp8"


def dtype_key(dtype: torch.dtype | str) -> str:
    """Normalise torch.bfloat16, "bfloat16", "bf16" ... to a DTYPES key.

    torch.float32 maps to "fp32" (CUDA cores); pass "tf32" for an fp32 matmul with TF32 allowed.
    """
    key = dtype.lower().removeprefix("torch.") if isinstance(dtype, str) else dtype
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} for a peak: use a torch dtype or one of {DTYPES}")
    return key


def peak_flops(dtype: torch.dtype | str, spec: GPUSpec | None = None) -> float:
    """Dense peak FLOP/s of `spec` (default: the current GPU) in `dtype`."""
    spec = gpu_spec() if spec is None else spec
    key = dtype_key(dtype)
    if key not in spec.peak_flops:
        raise ValueError(
            f"{spec.name} has no {key} peak (no fast path for it in hardware); "
            f"it has: {', '.join(spec.peak_flops)}"
        )
    return spec.peak_flops[key]


def ridge_point(spec: GPUSpec, dtype: torch.dtype | str) -> float:
    """Arithmetic intensity (FLOP/byte) where the memory roof meets the compute roof.

    Below it a kernel is memory-bound (faster memory helps), above it compute-bound (more FLOP/s helps).
    """
    return peak_flops(dtype, spec) / spec.mem_bandwidth


def attainable_flops(
    intensity: float | np.ndarray, spec: GPUSpec, dtype: torch.dtype | str
) -> float | np.ndarray:
    """Roofline bound: min(peak FLOP/s, intensity x bandwidth); intensity in FLOP/byte."""
    bound = np.minimum(peak_flops(dtype, spec), np.asarray(intensity, dtype=float) * spec.mem_bandwidth)
    return float(bound) if np.ndim(bound) == 0 else bound


def plot_roofline(
    ax: Axes,
    spec: GPUSpec,
    dtype: torch.dtype | str,
    points: dict[str, tuple[float, float]] | None = None,
) -> Axes:
    """Draw the roofline of `spec` in `dtype` on `ax` (log-log, TFLOP/s against FLOP/byte).

    points: {label: (intensity in FLOP/byte, measured FLOP/s)}, e.g. from BenchResult.flops/bytes and
    .tflops; each is drawn and labelled.
    """
    key = dtype_key(dtype)
    peak, bandwidth = peak_flops(key, spec), spec.mem_bandwidth
    ridge = peak / bandwidth
    points = points or {}

    # Span two decades either side of the ridge, widened to show every point.
    intensities = [i for i, _ in points.values() if i > 0]
    lo = min([ridge / 100, *(i / 2 for i in intensities)])
    hi = max([ridge * 100, *(i * 2 for i in intensities)])

    x_mem = np.geomspace(lo, ridge, 64)
    ax.plot(x_mem, x_mem * bandwidth / TERA, color="C0", label=f"memory roof: {bandwidth / TERA:.2f} TB/s")
    ax.plot(
        [ridge, hi],
        [peak / TERA, peak / TERA],
        color="C1",
        label=f"{key} compute roof: {peak / TERA:.0f} TFLOP/s",
    )
    ax.plot([ridge], [peak / TERA], "o", color="k")
    ax.annotate(
        f"ridge: {ridge:.0f} FLOP/B",
        (ridge, peak / TERA),
        textcoords="offset points",
        xytext=(0, 8),
        ha="center",
    )
    for i, (label, (intensity, flops_per_s)) in enumerate(points.items()):
        ax.plot([intensity], [flops_per_s / TERA], "x", color=f"C{i + 2}", markersize=8)
        ax.annotate(label, (intensity, flops_per_s / TERA), textcoords="offset points", xytext=(5, 5))

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    # Leave a decade below the lowest point of interest so slow kernels stay visible.
    floor = min([lo * bandwidth, *(f for _, f in points.values() if f > 0)]) / TERA
    ax.set_ylim(floor / 2, peak / TERA * 4)
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"Roofline: {spec.name}, {key}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    return ax
