"""Check common.bench against an independent timer: triton.testing.

A timer is only trustworthy if it agrees with another one built separately. Two cases cover both modes:

(a) a long kernel (y = x + 1 over 256 MiB of fp32, 512 MiB moved, ~0.18 ms on an H100) with a cold L2:
    bench(cache="cold") against triton.testing.do_bench(return_mode="median"), which also flushes
    (256 MiB) before every repetition. Memory-bound on purpose: a bf16 matmul 4096³ draws ~620 W on an
    H100, close enough to its power limit that its clock and so its time depend on what ran in the
    milliseconds before, and the two timers warm up differently (do_bench without flushes). In a probe of
    three runs on an H100 (not a committed result) the matmul ran at 1815 to 1890 MHz and the two medians
    differed by -0.4% to -3.6%; a stream's time is set by the memory clock, and it agreed within 0.6%;
(b) a tiny kernel (elementwise multiply of 4 MiB, a few µs) in a CUDA graph:
    bench(cuda_graph=True) against triton.testing.do_bench_cudagraph(return_mode="median").

Each side runs `rounds` times, interleaved and alternating who goes first, and the median of each side's
medians is compared, so a drift in clocks during the check hits both. Run it with `effdl bench timers`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common.bench import bench, save_results
from common.environment import environment
from common.hardware import NoGPUError, default_device

__all__ = ["run_timer_validation"]

TOLERANCE = 0.03  # relative difference of medians allowed between the two timers


def _interleaved_medians(
    ours: Callable[[], float], reference: Callable[[], float], rounds: int
) -> tuple[list[float], list[float]]:
    """Run both timers `rounds` times, alternating which goes first; return each side's medians (ms)."""
    ours_ms: list[float] = []
    reference_ms: list[float] = []
    for r in range(rounds):
        if r % 2 == 0:
            ours_ms.append(ours())
            reference_ms.append(reference())
        else:
            reference_ms.append(reference())
            ours_ms.append(ours())
    return ours_ms, reference_ms


def _check(
    name: str,
    ours_call: str,
    reference: str,
    reference_call: str,
    ours_ms: list[float],
    reference_ms: list[float],
    tolerance: float,
) -> dict[str, Any]:
    ours, ref = statistics.median(ours_ms), statistics.median(reference_ms)
    rel = (ours - ref) / ref
    return {
        "name": name,
        "ours": ours_call,
        "reference": reference,
        "reference_call": reference_call,
        "ours_ms": ours,
        "reference_ms": ref,
        "rel_diff": rel,
        "within_tolerance": abs(rel) <= tolerance,
        "ours_runs_ms": ours_ms,
        "reference_runs_ms": reference_ms,
    }


def _large_kernel_case(testing: Any, device: torch.device, rounds: int, tolerance: float) -> dict[str, Any]:
    """(a) >= 100 µs: y = x + 1 over 64M fp32 (256 MiB in, 256 MiB out), cold L2 on both sides."""
    x = torch.randn(1 << 26, device=device)
    y = torch.empty_like(x)

    def add_one() -> None:
        torch.add(x, 1.0, out=y)

    nbytes = x.nbytes + y.nbytes
    ours_ms, ref_ms = _interleaved_medians(
        lambda: bench(add_one, name="add one", bytes=nbytes, cache="cold").median_ms,
        lambda: testing.do_bench(add_one, return_mode="median"),
        rounds,
    )
    check = _check(
        "fp32 y = x + 1 over 64M elements, cold L2",
        "common.bench.bench(fn, cache='cold')",
        "triton.testing.do_bench",
        "triton.testing.do_bench(fn, return_mode='median')",
        ours_ms,
        ref_ms,
        tolerance,
    )
    check["gbps"] = nbytes / (check["ours_ms"] / 1e3) / 1e9
    check["kernel_over_100us"] = check["ours_ms"] >= 0.100
    return check


def _small_kernel_case(testing: Any, device: torch.device, rounds: int, tolerance: float) -> dict[str, Any]:
    """(b) <= 20 µs: y = 2x over 1M fp32 (4 MiB in, 4 MiB out) in a CUDA graph, warm L2 on both sides."""
    x = torch.randn(1 << 20, device=device)
    y = torch.empty_like(x)

    def scale() -> None:
        torch.mul(x, 2.0, out=y)

    ours_ms, ref_ms = _interleaved_medians(
        lambda: bench(scale, name="scale", cuda_graph=True).median_ms,
        lambda: testing.do_bench_cudagraph(scale, return_mode="median"),
        rounds,
    )
    check = _check(
        "fp32 y = 2x over 1M elements, CUDA graph, warm L2",
        "common.bench.bench(fn, cuda_graph=True)",
        "triton.testing.do_bench_cudagraph",
        "triton.testing.do_bench_cudagraph(fn, return_mode='median')",
        ours_ms,
        ref_ms,
        tolerance,
    )
    check["kernel_under_20us"] = check["ours_ms"] <= 0.020
    return check


def run_timer_validation(out_dir: Path, *, rounds: int = 5, tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Compare common.bench with triton.testing on the current GPU; write and return the report.

    The report: {"checks": [{"name", "ours_ms", "reference", "reference_ms", "rel_diff",
    "within_tolerance", ...}, ...], "all_within_tolerance", "env"}, written as JSON to
    out_dir / "bench_timer_validation.json" and returned with its "path". Takes ~10 s on an H100.
    """
    if not torch.cuda.is_available():
        raise NoGPUError(
            "the timer validation compares common.bench with triton.testing on a CUDA GPU, but no CUDA "
            "GPU is available (torch.cuda.is_available() is False); run `effdl bench timers` on a GPU machine"
        )
    import triton.testing  # imported here: triton is absent on macOS/Windows and slow to import

    device = default_device()
    torch.manual_seed(0)
    large = _large_kernel_case(triton.testing, device, rounds, tolerance)
    small = _small_kernel_case(triton.testing, device, rounds, tolerance)

    path = Path(out_dir) / "bench_timer_validation.json"
    report = {
        "kind": "bench_timer_validation",
        "tolerance": tolerance,
        "rounds": rounds,
        "checks": [large, small],
        "all_within_tolerance": large["within_tolerance"] and small["within_tolerance"],
        "env": environment(device),
    }
    save_results(report, path)
    return {**report, "path": str(path)}
