"""Week-3 benchmarks: what mixed precision, GPU JPEG decoding and fp8 buy on this GPU, against set goals.

    run_pipeline_benchmarks(Path("benchmarks/results"))      # `effdl bench pipelines`

Three comparisons, each timed with common.bench.compare (both sides interleaved in one process):

- autocast_step: one training step (forward, backward, AdamW) of a transformer block, bf16 autocast against
  fp32 with TF32 off for the whole step. The block is large enough (d_model 4096, 2048 tokens x 8) that
  matmuls dominate, so the ratio shows the tensor cores. Goal: >= 2x.
- jpeg_decode: decoding a batch of 1024x768 JPEGs, already in memory, with batched nvJPEG on the GPU against
  Pillow on one CPU core, both timed with CUDA events on the GPU's clock. Goal: >= 10x.
- fp8_gemm: an 8192^3 GEMM with per-tensor scaled e4m3 operands (torch._scaled_mm, fast accumulation)
  against bf16 (cuBLAS). Goal: >= 1.5x (the datasheet ratio is 2x). Recorded as skipped on GPUs without fp8.

Each comparison is saved as JSON (times, ratio, goal, environment) into out_dir, and a table of ratios and
goals is printed. quick=True runs smaller sizes, to check that everything works in a minute.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.io
from rich.console import Console
from rich.table import Table

from common import amp, data
from common.bench import Comparison, compare, environment, save_results
from common.hardware import NoGPUError, UnknownGPUError, gpu_spec
from common.models.transformer import TransformerBlock, block_flops

__all__ = ["PipelineResult", "run_pipeline_benchmarks"]


@dataclass
class PipelineResult:
    """One comparison and its goal: speedup = baseline time / candidate time, met if >= goal."""

    name: str
    description: str
    goal: float
    config: dict[str, Any]
    comparison: Comparison | None = None  # None when skipped
    skipped: str | None = None  # why, when the GPU can't run it
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        return None if self.comparison is None else self.comparison.speedup >= self.goal

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "description": self.description,
            "config": self.config,
            "goal": {"metric": "speedup", "op": ">=", "value": self.goal, "met": self.met},
            "speedup": None if self.comparison is None else self.comparison.speedup,
            "comparison": None if self.comparison is None else self.comparison.to_dict(),
            "skipped": self.skipped,
            **self.extra,
        }


def _frac_of_peak(tflops: float | None, dtype: str) -> float | None:
    """Measured TFLOP/s as a fraction of this GPU's datasheet peak in `dtype`, if the GPU is known."""
    try:
        peak = gpu_spec().peak_flops.get(dtype)
    except UnknownGPUError:
        return None
    return tflops * 1e12 / peak if tflops is not None and peak else None


def autocast_step(quick: bool) -> PipelineResult:
    d_model, heads, seq, batch = (1024, 8, 512, 4) if quick else (4096, 32, 2048, 8)
    device = torch.device("cuda", torch.cuda.current_device())
    x = torch.randn(batch, seq, d_model, device=device)
    target = torch.randn_like(x)

    def step_fn(policy: str) -> Callable[[], object]:
        torch.manual_seed(0)
        block = TransformerBlock(d_model, heads).to(device)
        optimizer = torch.optim.AdamW(block.parameters(), lr=1e-4, fused=True)
        return partial(amp.train_step, block, x, target, F.mse_loss, optimizer, policy)

    flops = block_flops(batch, seq, d_model)
    # The "fp32" policy keeps TF32 off for the whole step: train_step applies a policy's TF32 setting to the
    # forward, the backward and the optimizer step alike, and restores the previous setting after it.
    comparison = compare(
        step_fn("fp32"), step_fn("bf16"), names=("fp32, TF32 off", "bf16 autocast"), flops=flops
    )
    return PipelineResult(
        name="autocast_step",
        description="transformer block training step (forward, backward, AdamW): bf16 autocast vs fp32",
        goal=2.0,
        config={"d_model": d_model, "n_heads": heads, "seq": seq, "batch": batch, "flops": flops},
        comparison=comparison,
        extra={
            "frac_peak": {
                "baseline (fp32)": _frac_of_peak(comparison.baseline.tflops, "fp32"),
                "candidate (bf16)": _frac_of_peak(comparison.candidate.tflops, "bf16"),
            }
        },
    )


def jpeg_decode(quick: bool) -> PipelineResult:
    n, size = (16, (512, 512)) if quick else (64, (768, 1024))
    with tempfile.TemporaryDirectory() as tmp:
        encoded = [torchvision.io.read_file(str(p)) for p in data.write_jpegs(tmp, n, size=size, quality=90)]
    device = torch.device("cuda", torch.cuda.current_device())

    def pil() -> object:
        return [data.decode_jpeg_pil(e) for e in encoded]

    def gpu() -> object:
        images = torchvision.io.decode_jpeg(encoded, mode=torchvision.io.ImageReadMode.RGB, device=device)
        # nvJPEG may decode on a stream of its own: the sync puts the end of the decode before the timing
        # event that common.bench records on the current stream after this call returns.
        torch.cuda.synchronize(device)
        return images

    # Both sides are timed with CUDA events on this GPU (common.bench's timer for a CUDA device), so the
    # result records the GPU. Pillow's side launches no GPU work: on the idle GPU its two events are
    # stamped as they are recorded, a wall-clock time of the host's decoding.
    comparison = compare(
        pil,
        gpu,
        names=("Pillow, 1 CPU thread", "nvJPEG, GPU batch"),
        warmup_ms=200,
        rep_ms=2000,
        device=device,
    )
    megapixels = n * size[0] * size[1] / 1e6
    return PipelineResult(
        name="jpeg_decode",
        description=f"decode {n} JPEGs of {size[0]}x{size[1]} from memory: batched GPU decode vs Pillow",
        goal=10.0,
        config={"images": n, "height": size[0], "width": size[1], "quality": 90},
        comparison=comparison,
        extra={
            "images_per_s": {
                "baseline": n / comparison.baseline.median_ms * 1e3,
                "candidate": n / comparison.candidate.median_ms * 1e3,
            },
            "megapixels_per_s": {
                "baseline": megapixels / comparison.baseline.median_ms * 1e3,
                "candidate": megapixels / comparison.candidate.median_ms * 1e3,
            },
        },
    )


def fp8_gemm(quick: bool) -> PipelineResult:
    n = 4096 if quick else 8192
    result = PipelineResult(
        name="fp8_gemm",
        description=f"{n}^3 GEMM: per-tensor scaled e4m3 (torch._scaled_mm, fast accumulation) vs bf16",
        goal=1.5,
        config={"n": n, "fp8": "e4m3 x e4m3, per-tensor scales, out bf16, use_fast_accum=True"},
    )
    if not amp.fp8_supported():
        result.skipped = "fp8 tensor cores need compute capability >= 8.9"
        return result
    device = torch.device("cuda", torch.cuda.current_device())
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a16, b16 = a.bfloat16(), b.bfloat16()
    (a8, scale_a), (b8, scale_b) = amp.to_fp8(a), amp.to_fp8(b)
    b8 = b8.t().contiguous().t()  # column-major, as cuBLAS's fp8 GEMM requires
    fp8 = partial(amp.scaled_mm, a8, b8, scale_a, scale_b, use_fast_accum=True)
    result.comparison = compare(
        partial(torch.matmul, a16, b16), fp8, names=("bf16 (cuBLAS)", "fp8 e4m3"), flops=2 * n**3
    )
    reference = a.double() @ b.double()
    result.extra = {
        "frac_peak": {
            "baseline (bf16)": _frac_of_peak(result.comparison.baseline.tflops, "bf16"),
            "candidate (fp8)": _frac_of_peak(result.comparison.candidate.tflops, "fp8"),
        },
        "relative_error": {
            "baseline": ((a16 @ b16).double() - reference).norm().item() / reference.norm().item(),
            "candidate": (fp8().double() - reference).norm().item() / reference.norm().item(),
        },
    }
    return result


BENCHMARKS: tuple[Callable[[bool], PipelineResult], ...] = (autocast_step, jpeg_decode, fp8_gemm)


def _table(results: list[PipelineResult]) -> Table:
    table = Table(title="week-3 pipeline benchmarks")
    for column in (
        "benchmark",
        "baseline",
        "candidate",
        "baseline ms",
        "candidate ms",
        "speedup",
        "goal",
        "met",
    ):
        table.add_column(
            column, justify="left" if column in ("benchmark", "baseline", "candidate") else "right"
        )
    for r in results:
        c = r.comparison
        if c is None:
            table.add_row(r.name, "-", "-", "-", "-", "-", f">= {r.goal:g}x", f"skipped: {r.skipped}")
            continue
        table.add_row(
            r.name,
            c.baseline.name,
            c.candidate.name,
            f"{c.baseline.median_ms:.3f}",
            f"{c.candidate.median_ms:.3f}",
            f"{c.speedup:.2f}x",
            f">= {r.goal:g}x",
            "[green]met[/green]" if r.met else "[red]missed[/red]",
        )
    return table


def run_pipeline_benchmarks(out_dir: Path, quick: bool = False) -> list[Path]:
    """Run the week-3 benchmarks on the current GPU; write one JSON per benchmark; return their paths.

    Raises NoGPUError without a CUDA GPU: every comparison here is about what a GPU buys.
    """
    if not torch.cuda.is_available():
        raise NoGPUError(
            "the week-3 pipeline benchmarks measure GPU features (tensor cores, nvJPEG, fp8) and need a CUDA "
            "GPU; torch.cuda.is_available() is False here. Run them on a GPU machine."
        )
    out_dir = Path(out_dir)
    console = Console()
    env = environment()
    results, paths = [], []
    for benchmark in BENCHMARKS:
        console.print(f"running {benchmark.__name__}{' (quick)' if quick else ''} ...")
        result = benchmark(quick)
        results.append(result)
        suffix = "_quick" if quick else ""
        paths.append(
            save_results(
                {**result.to_dict(), "quick": quick, "environment": env},
                out_dir / f"pipelines_{result.name}{suffix}.json",
            )
        )
        torch.cuda.empty_cache()
    console.print(_table(results))
    return paths
