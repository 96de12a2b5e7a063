"""The kernel benchmark runner on a CPU: goals, kernel names, rows from injected timings, table, JSON, plot.

The runner itself needs a GPU (it must say so clearly without one); everything it does with the numbers is
checked here with CPU closures and with timings injected through common.bench.result_from_times.
No wall-clock thresholds: only the arithmetic on known times is checked exactly.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from common.bench import Comparison, result_from_times
from common.hardware import NoGPUError
from common.kernels.benchmark import (
    KERNEL_MODULES,
    Goal,
    KernelCase,
    case_row,
    kernel_table,
    require_gpu,
    resolve_kernels,
    run_cases,
    run_kernel_benchmarks,
    series_name,
)

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA GPU")


def comparison(
    base_ms: list[float], ours_ms: list[float], *, nbytes: float, measured_bw: float, mem: tuple
) -> Comparison:
    """A Comparison built from given times, as compare() would build it after timing."""
    common = {"timer": "cuda_event", "cache": "cold", "bytes": nbytes, "measured_bandwidth": measured_bw}
    base = result_from_times("torch", base_ms, peak_memory_bytes=mem[0], **common)
    ours = result_from_times("ours", ours_ms, peak_memory_bytes=mem[1], **common)
    ratios = [b / o for b, o in zip(base_ms, ours_ms, strict=True)]
    ratios_sorted = sorted(ratios)
    return Comparison(
        base, ours, ratios_sorted[len(ratios) // 2], ratios_sorted[0], ratios_sorted[-1], ratios
    )


# ---------------------------------------------------------------------------------------------------
# Goals and kernel names
# ---------------------------------------------------------------------------------------------------


def test_goal_verdicts() -> None:
    at_least = Goal("speedup", ">=", 0.9, ">= 0.9x cuBLAS")
    at_most = Goal("memory_ratio", "<=", 0.5, "<= half the memory")
    assert at_least.met(0.9) and at_least.met(1.3) and not at_least.met(0.89)
    assert at_most.met(0.5) and not at_most.met(0.51)
    assert at_least.met(None) is None  # not measurable (e.g. no peak for this GPU): neither met nor missed


def test_goal_rejects_unknown_metric_and_op() -> None:
    with pytest.raises(ValueError, match="unknown; use one of"):
        Goal("gflops", ">=", 1.0, "fast")
    with pytest.raises(ValueError, match="'>=' or '<='"):
        Goal("speedup", ">", 1.0, "faster")


def test_resolve_kernels() -> None:
    assert resolve_kernels(None) == list(KERNEL_MODULES)
    # Registry order, whatever order they were asked in; duplicates collapse.
    assert resolve_kernels(["matmul", "softmax", "matmul"]) == ["softmax", "matmul"]
    with pytest.raises(ValueError, match=r"unknown kernel name\(s\) \['softmaxx'\]; valid names: softmax, "):
        resolve_kernels(["softmaxx"])
    with pytest.raises(ValueError, match="no kernels selected"):
        resolve_kernels([])


def test_registry_covers_every_kernel_module() -> None:
    # Kernel modules are imported lazily by name: each must exist and expose benchmark_cases.
    assert {
        "softmax",
        "rmsnorm",
        "layernorm",
        "matmul",
        "matmul_decode",
        "linear_cross_entropy",
        "flash_attention",
        "int8_matmul",
    } <= set(KERNEL_MODULES)
    for module_name in set(KERNEL_MODULES.values()):
        assert callable(importlib.import_module(module_name).benchmark_cases), module_name


@no_cuda
def test_without_gpu_the_runner_says_so(tmp_path: Path) -> None:
    with pytest.raises(NoGPUError, match="needs a CUDA GPU"):
        run_kernel_benchmarks(tmp_path, kernels=["softmax"])
    with pytest.raises(NoGPUError, match="softmax benchmark needs a CUDA GPU"):
        importlib.import_module("common.kernels.softmax").benchmark_cases(quick=True)
    with pytest.raises(NoGPUError, match="matmul_decode benchmark needs a CUDA GPU"):
        importlib.import_module("common.kernels.matmul").decode_benchmark_cases(quick=True)
    with pytest.raises(NoGPUError, match="needs a CUDA GPU"):
        run_kernel_benchmarks(tmp_path, kernels=["matmul_decode"])
    with pytest.raises(NoGPUError):
        require_gpu("x")
    # A bad name is reported before the missing GPU: the user fixes the command first.
    with pytest.raises(ValueError, match="unknown kernel"):
        run_kernel_benchmarks(tmp_path, kernels=["nope"])
    assert not list(tmp_path.iterdir())


def test_series_name_drops_sizes() -> None:
    assert series_name("fwd 32768x4096 bf16") == "fwd bf16"
    assert series_name("decode 16x4096x14336 bf16") == "decode bf16"
    assert series_name("4096 M=16 N=4096") == "ours"
    assert series_name("portable 4096³ bf16") == "portable bf16"
    # matmul_decode: one line per weight and comparison, whatever M and the split.
    assert series_name("mlp_down 14336x4096 M=16 S=9 vs unsplit") == "mlp_down vs unsplit"


# ---------------------------------------------------------------------------------------------------
# A row from injected timings
# ---------------------------------------------------------------------------------------------------


def test_case_row_from_known_times() -> None:
    case = KernelCase(
        kernel="softmax",
        label="fwd 1024x1024 fp32",
        x=1024,
        ours=lambda: None,
        baseline=lambda: None,
        baseline_name="torch.softmax",
        bytes=8e9,
        dtype=torch.float32,
        goals=(
            Goal("frac_measured_bw", ">=", 0.85, ">= 85% of copy BW"),
            Goal("speedup", ">=", 2.5, ">= 2.5x torch"),
            Goal("memory_ratio", "<=", 1.0, "no more memory"),
            Goal("frac_peak_flops", ">=", 0.5, "half of peak"),
        ),
    )
    # ours: 2 ms for 8 GB = 4000 GB/s; baseline 4 ms. Measured copy bandwidth 4.5e12 B/s.
    c = comparison([4.0, 4.0, 4.0], [2.0, 2.0, 2.0], nbytes=8e9, measured_bw=4.5e12, mem=(400, 200))
    row = case_row(case, c)
    assert row["ours"]["median_ms"] == 2.0 and row["baseline"]["median_ms"] == 4.0
    assert row["ours"]["gbps"] == pytest.approx(4000.0)
    assert row["ours"]["frac_measured_bw"] == pytest.approx(4000 / 4500)
    assert row["speedup"] == pytest.approx(2.0)
    assert row["memory_ratio"] == pytest.approx(0.5)
    assert row["dtype"] == "float32"
    verdicts = {g["text"]: (g["measured"], g["met"]) for g in row["goals"]}
    assert verdicts[">= 85% of copy BW"] == (pytest.approx(4000 / 4500), True)
    assert verdicts[">= 2.5x torch"] == (pytest.approx(2.0), False)
    assert verdicts["no more memory"] == (pytest.approx(0.5), True)
    assert verdicts["half of peak"] == (None, None)  # no flops given: not measurable
    assert "times_ms" not in row["ours"]  # statistics only, the JSON stays readable

    console = Console(record=True, width=200)
    console.print(kernel_table("softmax", [row]))
    text = console.export_text()
    for expected in [
        "fwd 1024x1024 fp32",
        "torch.softmax",
        "4000 GB/s",
        "89%",
        "2.00x",
        "MISSED",
        "met",
        "n/a",
    ]:
        assert expected in text, expected

    # A narrow terminal folds cells onto more lines but never cuts a number short with an ellipsis.
    narrow = Console(record=True, width=70)
    narrow.print(kernel_table("softmax", [row]))
    narrow_text = narrow.export_text()
    assert "…" not in narrow_text
    cells = "".join(narrow_text.split())  # folded cells, read back without the line breaks and padding
    for expected in ["2.0000", "4.0000", "2.00x", "89%"]:
        assert expected in cells, expected


def test_case_row_judges_host_time_where_it_was_measured() -> None:
    case = KernelCase(
        kernel="matmul",
        label="1024x1024x1024 bf16",
        x=1024,
        ours=lambda: None,
        baseline=lambda: None,
        baseline_name="cuBLAS",
        goals=(Goal("host_us", "<=", 20.0, "<= 20 µs of host time per call"),),
        measure_host=True,
    )
    c = comparison([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], nbytes=None, measured_bw=None, mem=(1, 1))
    row = case_row(case, c, {"ours": 39.3, "baseline": 13.1})
    assert row["host_us"] == {"ours": 39.3, "baseline": 13.1}
    assert [(g["measured"], g["met"]) for g in row["goals"]] == [(39.3, False)]
    assert case_row(case, c)["goals"][0]["met"] is None  # not measured: not judged
    console = Console(record=True, width=200)
    console.print(kernel_table("matmul", [row]))
    assert "39/13" in console.export_text()


# ---------------------------------------------------------------------------------------------------
# The whole loop on CPU closures: JSON and PNG per kernel
# ---------------------------------------------------------------------------------------------------


def test_run_cases_writes_json_and_plot_per_kernel(tmp_path: Path) -> None:
    x = torch.randn(64, 64)
    cases = [
        KernelCase(
            kernel="toy_add",
            label=f"fwd {n}x64 fp32",
            x=n,
            ours=lambda n=n: x[:n] * 2,
            baseline=lambda n=n: x[:n] + x[:n],
            baseline_name="torch.add",
            bytes=2 * n * 64 * 4,
            dtype=torch.float32,
            goals=(Goal("speedup", ">=", 1e-6, "not absurdly slow"),),
        )
        for n in (16, 64)
    ] + [
        KernelCase(
            kernel="toy_mm",
            label="64x64x64 fp32",
            x=64,
            ours=lambda: x @ x,
            baseline=lambda: torch.mm(x, x),
            baseline_name="torch.mm",
            flops=2 * 64**3,
            dtype=torch.float32,
        )
    ]
    console = Console(record=True, width=200)
    paths, failures = run_cases(cases, tmp_path, quick=True, device="cpu", console=console)
    assert failures == []
    names = sorted(p.name for p in paths)
    assert names == [
        "kernels_toy_add_quick.json",
        "kernels_toy_add_quick.png",
        "kernels_toy_mm_quick.json",
        "kernels_toy_mm_quick.png",
    ]
    for path in paths:
        assert path.exists() and path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = json.loads((tmp_path / "kernels_toy_add_quick.json").read_text())
    assert report["kernel"] == "toy_add" and report["quick"] is True
    assert [c["label"] for c in report["cases"]] == ["fwd 16x64 fp32", "fwd 64x64 fp32"]
    assert report["goals_met"] + report["goals_missed"] + report["goals_unmeasured"] == 2
    assert report["env"]["device"] == "cpu" and report["env"]["torch"] == torch.__version__
    for case in report["cases"]:
        # The stored rates are the caller's bytes over the stored median time, and the fraction of the measured
        # copy bandwidth is that rate over the stored ceiling: a reader can recompute every number in the file.
        ours, base = case["ours"], case["baseline"]
        assert ours["gbps"] == pytest.approx(case["bytes"] / (ours["median_ms"] / 1e3) / 1e9, rel=1e-9)
        assert ours["frac_measured_bw"] == pytest.approx(
            ours["gbps"] * 1e9 / report["measured_copy_bandwidth"]
        )
        assert ours["p20_ms"] <= ours["median_ms"] <= ours["p80_ms"] and ours["min_ms"] <= ours["p20_ms"]
        # The speedup is the median of per-pair ratios, so it lies between the extremes of baseline / ours.
        assert case["speedup_p20"] <= case["speedup"] <= case["speedup_p80"]
        assert base["min_ms"] / ours["p80_ms"] * 0.5 <= case["speedup"] <= base["p80_ms"] / ours["min_ms"] * 2
    mm = json.loads((tmp_path / "kernels_toy_mm_quick.json").read_text())
    mm_case = mm["cases"][0]
    assert mm_case["flops"] == 2 * 64**3
    assert mm_case["ours"]["tflops"] == pytest.approx(
        mm_case["flops"] / (mm_case["ours"]["median_ms"] / 1e3) / 1e12, rel=1e-9
    )
    text = console.export_text()
    assert "kernel: toy_add (baseline: torch.add)" in text and "kernel: toy_mm (baseline: torch.mm)" in text


def test_a_failing_case_is_reported_and_the_rest_still_run(tmp_path: Path) -> None:
    def broken() -> None:
        raise RuntimeError("kernel exploded")

    x = torch.randn(32, 32)
    cases = [
        KernelCase("toy", "broken 32 fp32", 32, broken, lambda: x + x, "torch.add", bytes=8192.0),
        KernelCase("toy", "fine 32 fp32", 32, lambda: x * 2, lambda: x + x, "torch.add", bytes=8192.0),
    ]
    console = Console(record=True, width=200)
    paths, failures = run_cases(cases, tmp_path, quick=True, device="cpu", console=console)
    assert len(failures) == 1 and "broken 32 fp32" in failures[0] and "kernel exploded" in failures[0]
    report = json.loads((tmp_path / "kernels_toy_quick.json").read_text())
    assert [c["label"] for c in report["cases"]] == ["fine 32 fp32"]
    assert (
        report["failed"][0]["label"] == "broken 32 fp32" and "kernel exploded" in report["failed"][0]["error"]
    )
    assert "FAILED" in console.export_text()
    assert {p.name for p in paths} == {"kernels_toy_quick.json", "kernels_toy_quick.png"}
