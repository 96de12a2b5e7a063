"""`effdl env`: what this machine has, for students checking their setup and for bug reports."""

from __future__ import annotations

import os
import platform
import shutil

from rich.console import Console
from rich.table import Table

from common.environment import library_versions
from common.slides import MARP, chromium_executable


def _gpu_rows() -> list[tuple[str, str]]:
    import torch

    from common.hardware import UnknownGPUError, gpu_spec

    if not torch.cuda.is_available():
        return [("GPU", "none (CUDA not available): seminars run with small sizes on the CPU")]
    rows = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        device = torch.device("cuda", index)
        line = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, sm_{props.major}{props.minor}"
        try:
            spec = gpu_spec(device)
            peak = spec.peak_flops.get("bf16")
            peak_text = f"{peak / 1e12:.0f} TFLOP/s bf16, " if peak else ""
            line += f"; spec {spec.name}: {peak_text}{spec.mem_bandwidth / 1e12:.2f} TB/s"
        except UnknownGPUError:
            line += "; not in the spec table (pass peaks to common.hardware explicitly)"
        rows.append((f"GPU {index}", line))
    return rows


def environment_report(console: Console | None = None) -> None:
    """Print the hardware, library versions and course tools found on this machine."""
    console = console or Console()
    table = Table(title="effdl env", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("platform", f"{platform.platform()} ({os.cpu_count()} CPU cores)")
    for name, version in library_versions().items():
        table.add_row(name, version or "not installed")
    for name, value in _gpu_rows():
        table.add_row(name, value)
    node = shutil.which("node")
    table.add_row("node", node or "not found (needed to build slides)")
    table.add_row("marp", str(MARP) if MARP.exists() else "not installed: run `npm ci`")
    table.add_row("chromium", chromium_executable() or "not found (needed for slide PDFs and previews)")
    console.print(table)
