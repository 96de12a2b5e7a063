"""`effdl bench kernels`: every kernel against its PyTorch baseline, one table, one JSON and one plot each.

Each kernel module exposes `benchmark_cases(quick=False) -> list[KernelCase]`: a size sweep of no-argument
closures over inputs it has already allocated on the GPU, ours and the baseline's, with the work of one
call (FLOPs, minimal bytes moved) and the goals the kernel is held to. This module times each case with
common.bench.compare (baseline and ours interleaved in one process, L2 flushed before every repetition),
and for every case records

- the median time of each side, with p20/p80,
- TFLOP/s or GB/s, as a fraction of the datasheet peak and (for bytes) of the measured device-copy
  bandwidth, which is the honest ceiling of a memory-bound kernel,
- the speedup (baseline time / our time, median of per-pair ratios) and the ratio of peak memory,
- each Goal as met or missed.

It prints a table per kernel, and writes `kernels_<kernel>.json` (with the environment: GPU, clocks,
versions) and `kernels_<kernel>.png` (throughput and speedup against the sweep) into the output folder,
`benchmarks/results/` for `effdl bench kernels`. Quick mode (`--quick`) runs a short sweep with short
timing budgets, writes `kernels_<kernel>_quick.*`, and is a smoke test, not a number to quote. A case
whose kernel raises is reported as FAILED and the run goes on; the run then ends with a BenchError
listing the failures, after every other result has been written.

    run_kernel_benchmarks(Path("benchmarks/results"), kernels=["softmax", "matmul"])
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from common.bench import (
    BenchError,
    Comparison,
    compare,
    environment,
    host_time_us,
    measured_copy_bandwidth,
    save_results,
)
from common.hardware import NoGPUError, default_device

__all__ = [
    "GOAL_METRICS",
    "KERNEL_MODULES",
    "Goal",
    "KernelCase",
    "case_row",
    "plot_kernel",
    "require_gpu",
    "resolve_kernels",
    "run_cases",
    "run_kernel_benchmarks",
]

# What a Goal can be about; each is a key of a case's row (see case_row).
GOAL_METRICS = ("speedup", "frac_measured_bw", "frac_peak_flops", "memory_ratio", "host_us")

# Kernel name (KernelCase.kernel, and what `effdl bench kernels --kernel NAME` takes) -> the module whose
# benchmark_cases() yields its cases. Imported lazily, by name: importing a kernel module compiles nothing,
# but it is only worth doing for the kernels asked for. One module may hold several kernels (norms).
KERNEL_MODULES: dict[str, str] = {
    "softmax": "common.kernels.softmax",
    "rmsnorm": "common.kernels.norms",
    "layernorm": "common.kernels.norms",
    "matmul": "common.kernels.matmul",
    "matmul_decode": "common.kernels.matmul",
    "linear_cross_entropy": "common.kernels.cross_entropy",
    "flash_attention": "common.kernels.flash_attention",
    "int8_matmul": "common.kernels.int8_matmul",
}

# (warm-up, timed) budgets in ms per side and case. Full: common.bench's defaults, which match
# triton.testing.do_bench. Quick: enough to see that everything runs and roughly how fast.
TIMING_MS = {False: (25.0, 100.0), True: (5.0, 20.0)}
# Columns of the console the tables are printed to, at least: every column fits without folding.
TABLE_WIDTH = 180


@dataclass(frozen=True)
class Goal:
    """A target a kernel is held to, e.g. Goal("speedup", ">=", 0.9, ">= 0.9x cuBLAS").

    metric: "speedup" (baseline time / ours), "frac_measured_bw" (our GB/s / measured copy bandwidth),
    "frac_peak_flops" (our TFLOP/s / datasheet peak), "memory_ratio" (our peak memory / baseline's) or
    "host_us" (our host time per call, common.bench.host_time_us; the case must set measure_host).
    """

    metric: str
    op: str  # ">=" or "<="
    value: float
    text: str

    def __post_init__(self) -> None:
        if self.metric not in GOAL_METRICS:
            raise ValueError(f"Goal metric {self.metric!r} is unknown; use one of {GOAL_METRICS}")
        if self.op not in (">=", "<="):
            raise ValueError(f"Goal op {self.op!r} is unknown; use '>=' or '<='")

    def met(self, measured: float | None) -> bool | None:
        """Whether `measured` meets the goal; None where it could not be measured (e.g. unknown GPU)."""
        if measured is None:
            return None
        return measured >= self.value if self.op == ">=" else measured <= self.value


@dataclass
class KernelCase:
    """One point of a kernel's size sweep: our closure and the baseline's over pre-allocated inputs.

    label names the case, e.g. "fwd 32768x4096 bf16". The plot joins cases of one kernel whose labels agree
    once size tokens ("32768x4096", "M=16", "4096") are dropped into one line, so "fwd 1024x4096 bf16" and
    "fwd 2048x4096 bf16" are two points of the line "fwd bf16", placed at x.
    flops: floating-point work of one call; bytes: the least memory traffic of one call (each input read
    once, each output written once), for GB/s. dtype: what the flops are done in, for the peak.
    """

    kernel: str
    label: str
    x: float
    ours: Callable[[], object]
    baseline: Callable[[], object]
    baseline_name: str
    flops: float | None = None
    bytes: float | None = None
    dtype: torch.dtype | None = None
    goals: tuple[Goal, ...] = ()
    measure_host: bool = False  # also time what one call costs the host (both sides)


def require_gpu(what: str) -> torch.device:
    """The current CUDA device, or NoGPUError saying that `what` needs one (benchmarks are GPU-only)."""
    if not torch.cuda.is_available():
        raise NoGPUError(
            f"{what} needs a CUDA GPU, but none is available (torch.cuda.is_available() is False). "
            "On a CPU the kernels run in Triton's interpreter, which checks correctness but says nothing "
            "about speed: run `effdl bench kernels` on a GPU machine, and `pytest tests/kernels` here."
        )
    return default_device()


def resolve_kernels(kernels: Iterable[str] | None) -> list[str]:
    """The kernel names to run, in registry order (all when `kernels` is None); unknown names raise."""
    if kernels is None:
        return list(KERNEL_MODULES)
    wanted = list(kernels)
    unknown = [k for k in wanted if k not in KERNEL_MODULES]
    if unknown:
        raise ValueError(
            f"unknown kernel name(s) {unknown}; valid names: {', '.join(KERNEL_MODULES)} "
            "(e.g. `effdl bench kernels --kernel softmax --kernel matmul`)"
        )
    if not wanted:
        raise ValueError(f"no kernels selected; pick from {', '.join(KERNEL_MODULES)}, or pass None for all")
    return [k for k in KERNEL_MODULES if k in wanted]


def _module_cases(module_name: str, kernels: list[str], quick: bool) -> list[KernelCase]:
    module = importlib.import_module(module_name)
    cases = [c for c in module.benchmark_cases(quick=quick) if c.kernel in kernels]
    missing = sorted(set(kernels) - {c.kernel for c in cases})
    if missing:
        raise RuntimeError(f"{module_name}.benchmark_cases() returned no cases for {missing}")
    return cases


# ----------------------------------------------------------------------------------------------------
# One case: a Comparison becomes a row of plain numbers (pure, so it is tested without a GPU).
# ----------------------------------------------------------------------------------------------------

_SIDE_FIELDS = (
    "median_ms",
    "p20_ms",
    "p80_ms",
    "min_ms",
    "n",
    "tflops",
    "gbps",
    "frac_peak_flops",
    "frac_peak_bw",
    "frac_measured_bw",
    "peak_memory_bytes",
)


def case_row(
    case: KernelCase, comparison: Comparison, host_us: dict[str, float] | None = None
) -> dict[str, Any]:
    """Summarise one timed case: both sides' statistics, speedup, memory ratio, host time per call where
    measured ({"ours": µs, "baseline": µs}) and each goal's verdict.

    Per-repetition times are left out of the row (the statistics summarise them) to keep the JSON readable.
    """
    ours, base = comparison.candidate, comparison.baseline
    memory_ratio = (
        ours.peak_memory_bytes / base.peak_memory_bytes
        if ours.peak_memory_bytes is not None and base.peak_memory_bytes
        else None
    )
    metrics = {
        "speedup": comparison.speedup,
        "frac_measured_bw": ours.frac_measured_bw,
        "frac_peak_flops": ours.frac_peak_flops,
        "memory_ratio": memory_ratio,
        "host_us": host_us["ours"] if host_us else None,
    }
    goals = [
        {
            "text": g.text,
            "metric": g.metric,
            "op": g.op,
            "value": g.value,
            "measured": metrics[g.metric],
            "met": g.met(metrics[g.metric]),
        }
        for g in case.goals
    ]
    return {
        "kernel": case.kernel,
        "label": case.label,
        "x": case.x,
        "dtype": str(case.dtype).removeprefix("torch.") if case.dtype is not None else None,
        "flops": case.flops,
        "bytes": case.bytes,
        "baseline_name": case.baseline_name,
        "ours": {f: getattr(ours, f) for f in _SIDE_FIELDS},
        "baseline": {f: getattr(base, f) for f in _SIDE_FIELDS},
        "speedup": comparison.speedup,
        "speedup_p20": comparison.speedup_p20,
        "speedup_p80": comparison.speedup_p80,
        "memory_ratio": memory_ratio,
        "host_us": host_us,
        "goals": goals,
    }


def measure_case(case: KernelCase, *, quick: bool = False, device: torch.device | str | None = None) -> dict:
    """Time baseline and ours interleaved (cold L2) and return the case's row."""
    warmup_ms, rep_ms = TIMING_MS[quick]
    comparison = compare(
        case.baseline,
        case.ours,
        names=(case.baseline_name, f"{case.kernel} {case.label}"),
        flops=case.flops,
        bytes=case.bytes,
        dtype=case.dtype if case.flops is not None else None,
        warmup_ms=warmup_ms,
        rep_ms=rep_ms,
        device=device,
    )
    host_us = None
    if case.measure_host:
        host_us = {
            "ours": host_time_us(case.ours, device=device),
            "baseline": host_time_us(case.baseline, device=device),
        }
    return case_row(case, comparison, host_us)


# ----------------------------------------------------------------------------------------------------
# Reporting: table, JSON, plot
# ----------------------------------------------------------------------------------------------------


def _pct(frac: float | None) -> str:
    return "-" if frac is None else f"{100 * frac:.0f}%"


def _throughput(side: dict[str, Any]) -> str:
    if side["tflops"] is not None:
        return f"{side['tflops']:.1f} TFLOP/s"
    if side["gbps"] is not None:
        return f"{side['gbps']:.0f} GB/s"
    return "-"


def _goal_text(goal: dict[str, Any]) -> str:
    verdict = {True: "[green]met[/green]", False: "[red]MISSED[/red]", None: "[yellow]n/a[/yellow]"}
    return f"{verdict[goal['met']]} {goal['text']}"


def kernel_table(kernel: str, rows: list[dict[str, Any]]) -> Table:
    """A rich table of one kernel's rows: times, throughput, % of peak and of copy bandwidth, goals."""
    baselines = ", ".join(dict.fromkeys(r["baseline_name"] for r in rows))
    table = Table(title=f"kernel: {kernel} (baseline: {baselines})", title_justify="left")
    for name, justify in [
        ("case", "left"),
        ("ours ms", "right"),
        ("baseline ms", "right"),
        ("ours", "right"),
        ("% peak", "right"),
        ("% copy BW", "right"),
        ("ours vs baseline", "right"),
        ("mem ratio", "right"),
        ("host µs ours/base", "right"),
        ("goals", "left"),
    ]:
        # fold, never truncate: in a narrow terminal a number breaks onto a second line instead of
        # losing digits to an ellipsis.
        table.add_column(name, justify=justify, overflow="fold", min_width=min(len(name), 9))  # type: ignore[arg-type]
    for row in rows:
        ours = row["ours"]
        peak = ours["frac_peak_flops"] if ours["tflops"] is not None else ours["frac_peak_bw"]
        table.add_row(
            row["label"],
            f"{ours['median_ms']:.4f}",
            f"{row['baseline']['median_ms']:.4f}",
            _throughput(ours),
            _pct(peak),
            _pct(ours["frac_measured_bw"]),
            f"{row['speedup']:.2f}x",
            "-" if row["memory_ratio"] is None else f"{row['memory_ratio']:.2f}",
            f"{row['host_us']['ours']:.0f}/{row['host_us']['baseline']:.0f}" if row.get("host_us") else "-",
            "\n".join(_goal_text(g) for g in row["goals"]) or "-",
        )
    return table


# Size tokens dropped from a label to name its line in the plot: "4096", "32768x4096", "M=16", "4096³".
_SIZE_TOKEN = re.compile(r"^(\w+=)?\d+([x×]\d+)*[²³]?$")


def series_name(label: str) -> str:
    """The plot line a case belongs to: its label without size tokens ("fwd 1024x4096 bf16" -> "fwd bf16")."""
    return " ".join(t for t in label.split() if not _SIZE_TOKEN.match(t)) or "ours"


def plot_kernel(
    kernel: str, rows: list[dict[str, Any]], path: Path, copy_bandwidth: float | None = None
) -> Path:
    """Two panels against the sweep: throughput of ours (solid) and the baseline (dashed), and speedup.

    Throughput is TFLOP/s when every case counts FLOPs, else GB/s (with the measured copy bandwidth as a
    dotted ceiling), else time in ms.
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in a headless run

    if all(r["flops"] for r in rows):
        unit, key = "TFLOP/s", "tflops"
    elif all(r["bytes"] for r in rows):
        unit, key = "GB/s", "gbps"
    else:
        unit, key = "ms (lower is better)", "median_ms"
    series: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        series.setdefault(series_name(row["label"]), []).append(row)

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax_rate, ax_speedup = fig.subplots(1, 2)
    for i, (name, points) in enumerate(series.items()):
        points = sorted(points, key=lambda r: r["x"])
        xs = [r["x"] for r in points]
        color = f"C{i % 10}"
        ax_rate.plot(xs, [r["ours"][key] for r in points], "o-", color=color, label=f"{name}: ours")
        ax_rate.plot(
            xs,
            [r["baseline"][key] for r in points],
            "x--",
            color=color,
            label=f"{name}: {points[0]['baseline_name']}",
        )
        ax_speedup.plot(xs, [r["speedup"] for r in points], "o-", color=color, label=name)
    if unit == "GB/s" and copy_bandwidth:
        ax_rate.axhline(copy_bandwidth / 1e9, color="k", linestyle=":", label="measured copy bandwidth")
    ax_speedup.axhline(1.0, color="k", linewidth=0.8)
    for ax, ylabel in [(ax_rate, unit), (ax_speedup, "speedup over baseline (x)")]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("size")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    ax_rate.set_title(f"{kernel}: throughput")
    ax_speedup.set_title(f"{kernel}: baseline time / our time")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def run_cases(
    cases: list[KernelCase],
    out_dir: Path,
    *,
    quick: bool = False,
    device: torch.device | str | None = None,
    console: Console | None = None,
) -> tuple[list[Path], list[str]]:
    """Measure `cases` kernel by kernel (in order); after each kernel print its table, write its JSON and plot.

    A case whose closure raises is reported (in the table and the JSON's "failed" list) and the run goes
    on, so one broken case doesn't cost the measurements of the others. Returns the written paths and the
    failures as "kernel label: error" lines. device: where the cases run (default: the current CUDA device,
    else the CPU, which is for testing this runner with CPU closures).
    """
    # At least TABLE_WIDTH columns: rich would otherwise squeeze the table into a narrow terminal (or the
    # 80 columns it assumes when output is piped to a file).
    console = console or Console(width=max(TABLE_WIDTH, Console().width))
    dev = torch.device(device) if device is not None else default_device()
    env = environment(dev)
    copy_bandwidth = measured_copy_bandwidth(dev) if any(c.bytes for c in cases) else None
    groups: dict[str, list[KernelCase]] = {}
    for case in cases:
        groups.setdefault(case.kernel, []).append(case)

    paths: list[Path] = []
    failures: list[str] = []
    suffix = "_quick" if quick else ""
    warmup_ms, rep_ms = TIMING_MS[quick]
    for kernel, group in groups.items():
        rows, failed = [], []
        for case in group:
            console.print(f"[dim]timing {kernel} {case.label} ...[/dim]")
            try:
                rows.append(measure_case(case, quick=quick, device=dev))
            except BenchError as err:
                console.print(f"[red]FAILED[/red] {kernel} {case.label}: {err}")
                failed.append({"label": case.label, "error": str(err)})
                failures.append(f"{kernel} {case.label}: {err}")
        if rows:
            console.print(kernel_table(kernel, rows))
        goals = [g["met"] for r in rows for g in r["goals"]]
        report = {
            "kind": "kernel_benchmark",
            "kernel": kernel,
            "quick": quick,
            "timing": {"warmup_ms": warmup_ms, "rep_ms": rep_ms, "cache": "cold", "interleaved": True},
            "measured_copy_bandwidth": copy_bandwidth,
            "goals_met": goals.count(True),
            "goals_missed": goals.count(False),
            "goals_unmeasured": goals.count(None),
            "cases": rows,
            "failed": failed,
            "env": env,
        }
        paths.append(save_results(report, Path(out_dir) / f"kernels_{kernel}{suffix}.json"))
        if rows:
            png = Path(out_dir) / f"kernels_{kernel}{suffix}.png"
            paths.append(plot_kernel(kernel, rows, png, copy_bandwidth))
    return paths, failures


def run_kernel_benchmarks(out_dir: Path, kernels: list[str] | None = None, quick: bool = False) -> list[Path]:
    """Benchmark the named kernels (default: all) on the current GPU; return the JSON and PNG paths written.

    Raises ValueError for an unknown kernel name, NoGPUError without a CUDA GPU, and BenchError at the end
    if any case failed (after writing the results of all the others).
    """
    selected = resolve_kernels(kernels)
    require_gpu("`effdl bench kernels`")
    by_module: dict[str, list[str]] = {}
    for name in selected:
        by_module.setdefault(KERNEL_MODULES[name], []).append(name)
    paths: list[Path] = []
    failures: list[str] = []
    for module_name, names in by_module.items():
        # One module's cases at a time: they hold their inputs on the GPU, so free them before the next.
        cases = _module_cases(module_name, names, quick)
        written, failed = run_cases(cases, Path(out_dir), quick=quick)
        paths += written
        failures += failed
        del cases
        torch.cuda.empty_cache()
    if failures:
        raise BenchError(
            f"{len(failures)} benchmark case(s) failed (the others' results are in {out_dir}):\n  "
            + "\n  ".join(failures)
        )
    return paths
