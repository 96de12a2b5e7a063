"""What machine and which versions produced a number: the record that travels with every result.

    environment()       # {"device": "cuda:0", "gpu": "NVIDIA H100 80GB HBM3", "sm_clock_mhz": 1980, "torch": ...}

common.bench attaches environment() to every BenchResult, `effdl seminar --record` stores library_versions()
and device_name() in a notebook's metadata, and `effdl env` prints them. Nothing here names the host.

Library versions come from the installed packages' metadata (importlib.metadata), not from importing them:
a version check must not import the library it checks. Importing triton (or torchvision, which imports
triton) on a machine without a GPU before common.kernels has switched on Triton's interpreter leaves behind a
compile-only copy of triton (see common.kernels._switch_on_interpreter). torch itself is imported anyway,
and its version string names the CUDA build (2.11.0+cu130), which the package metadata may not.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

from common.hardware import NoGPUError, default_device

__all__ = [
    "device_folder",
    "device_name",
    "environment",
    "library_versions",
    "lock_mismatches",
    "locked_versions",
    "package_version",
]

# Packages whose version can change a number, read from their metadata (never imported here).
VERSIONED_PACKAGES = ("triton", "torchvision", "numpy")


def package_version(distribution: str) -> str | None:
    """The installed version of a package, e.g. package_version("triton"); None where it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:  # e.g. no triton on macOS or Windows
        return None


def library_versions() -> dict[str, str | None]:
    """Versions of what produces a number: Python, torch and its CUDA, triton, torchvision, numpy."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,  # None for a CPU-only build of torch
        **{name: package_version(name) for name in VERSIONED_PACKAGES},
    }


def device_name() -> str:
    """The GPU this process computes on, or `cpu` where there is none."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def locked_versions(lock_file: Path | None = None) -> dict[str, str]:
    """The versions uv.lock pins for torch and VERSIONED_PACKAGES: what recorded results must be made with."""
    import tomllib

    from common.weeks import REPO_ROOT

    with open(lock_file or REPO_ROOT / "uv.lock", "rb") as lock:
        packages = tomllib.load(lock)["package"]
    wanted = {"torch", *VERSIONED_PACKAGES}
    return {p["name"]: p["version"] for p in packages if p["name"] in wanted}


def lock_mismatches(recorded: dict[str, Any], lock_file: Path | None = None) -> list[str]:
    """How the versions a result or notebook recorded differ from uv.lock's; empty when they match.

    torch's recorded version carries its CUDA build (2.11.0+cu130); the lock pins the release (2.11.0).
    """
    problems = []
    for name, pinned in sorted(locked_versions(lock_file).items()):
        version = recorded.get(name)
        if version is None or version.split("+")[0] != pinned:
            problems.append(f"{name} {version} recorded, uv.lock pins {pinned}")
    return problems


def device_folder(name: str | None = None) -> str:
    """A folder name for results of this device: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3".

    Without a GPU the machine is its CPU model and core count ("cpu-amd-epyc-2-cores"): CPU results, such as
    week 4's gloo benchmarks, depend on both.
    """
    if name is None and not torch.cuda.is_available():
        static = _static_environment()
        name = f"cpu {static['cpu'] or ''} {static['cpu_count']} cores"
    return re.sub(r"[^a-z0-9]+", "-", (name or device_name()).lower()).strip("-")


@functools.lru_cache(maxsize=1)
def _static_environment() -> dict[str, Any]:
    """What cannot change while the process runs: versions, platform, CPU model and core count."""
    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        **library_versions(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
    }


_NVSMI_FIELDS = {
    "driver": "driver_version",
    "sm_clock_mhz": "clocks.sm",
    "mem_clock_mhz": "clocks.mem",
    "max_sm_clock_mhz": "clocks.max.sm",
    "max_mem_clock_mhz": "clocks.max.mem",
    "temperature_c": "temperature.gpu",
    "power_w": "power.draw",
    "pstate": "pstate",
}


def _nvidia_smi(device: torch.device) -> dict[str, Any]:
    """Clocks, driver and power from nvidia-smi, sampled now; None for each field if unavailable."""
    values: dict[str, Any] = dict.fromkeys(_NVSMI_FIELDS)
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return values
    # Select the GPU by UUID: CUDA's device index and nvidia-smi's can differ (CUDA_VISIBLE_DEVICES,
    # CUDA_DEVICE_ORDER), the UUID can't.
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    uuid = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    cmd = [
        exe,
        "-i",
        uuid,
        f"--query-gpu={','.join(_NVSMI_FIELDS.values())}",
        "--format=csv,noheader,nounits",
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return values
    parts = [p.strip() for p in out.strip().splitlines()[0].split(",")] if out.strip() else []
    for key, raw in zip(_NVSMI_FIELDS, parts, strict=False):
        if raw.startswith("[") or raw == "":  # "[N/A]", "[Not Supported]"
            continue
        try:
            values[key] = int(raw) if raw.isdigit() else float(raw)
        except ValueError:
            values[key] = raw  # driver version, pstate
    if values["driver"] is not None:
        values["driver"] = str(values["driver"])
    return values


def _device(device: torch.device | str | int | None) -> torch.device:
    """device as a torch.device with its index (default: the current CUDA device, else the CPU)."""
    if device is None:
        return default_device()
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise NoGPUError(
            f"environment({str(dev)!r}) describes a CUDA GPU, but none is available here "
            "(torch.cuda.is_available() is False): pass device='cpu', or leave device=None"
        )
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


def environment(device: torch.device | str | int | None = None) -> dict[str, Any]:
    """What produced a number: GPU, clocks (sampled now), driver and library versions. No hostname."""
    dev = _device(device)
    env: dict[str, Any] = {"device": str(dev), **_static_environment()}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(
            gpu=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            memory_bytes=props.total_memory,
            l2_bytes=props.L2_cache_size,
            float32_matmul_precision=torch.get_float32_matmul_precision(),
            **_nvidia_smi(dev),
        )
    else:
        env.update(gpu=None, torch_threads=torch.get_num_threads())
    return env
