"""common.environment: what machine and versions produced a number, read without importing the libraries."""

from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.bench import bench
from common.environment import (
    device_name,
    environment,
    library_versions,
    lock_mismatches,
    locked_versions,
    package_version,
)
from common.hardware import NoGPUError
from common.weeks import REPO_ROOT

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA GPU")


def test_environment_is_json_and_hostname_free() -> None:
    env = environment("cpu")
    text = json.dumps(env)
    assert socket.gethostname() not in text.split('"')
    assert {"python", "torch", "cuda", "triton", "torchvision", "numpy", "gpu", "cpu_count"} <= set(env)
    assert env["device"] == "cpu" and env["gpu"] is None


def test_versions_come_from_package_metadata() -> None:
    versions = library_versions()
    assert versions["torch"] == torch.__version__  # names the CUDA build, which the metadata may not
    for name in ("triton", "torchvision", "numpy"):
        try:
            expected: str | None = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            expected = None
        assert versions[name] == expected


def test_a_package_that_is_not_installed_has_no_version() -> None:
    assert package_version("effdl-package-that-does-not-exist") is None


def test_reading_versions_imports_neither_triton_nor_torchvision() -> None:
    # Importing triton before common.kernels switches on the interpreter leaves a compile-only copy behind.
    code = (
        "import sys\n"
        "from common.environment import environment, library_versions\n"
        "library_versions(); environment('cpu')\n"
        "print(sorted(m for m in ('triton', 'torchvision') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_bench_results_carry_the_environment() -> None:
    r = bench(lambda: None, device="cpu", warmup_ms=0, rep_ms=0, min_reps=3, max_reps=3)
    assert {key: r.env[key] for key in library_versions()} == library_versions()


@no_cuda
def test_without_a_gpu() -> None:
    assert device_name() == "cpu"
    assert environment()["device"] == "cpu"
    with pytest.raises(NoGPUError, match=r"environment\('cuda'\).*no.*available.*device='cpu'"):
        environment("cuda")


def test_locked_versions_are_read_from_uv_lock(tmp_path: Path) -> None:
    lock = tmp_path / "uv.lock"
    lock.write_text(
        "version = 1\n"
        '[[package]]\nname = "numpy"\nversion = "2.2.6"\n'
        '[[package]]\nname = "torch"\nversion = "2.11.0"\n'
        '[[package]]\nname = "rich"\nversion = "15.0.0"\n'
    )
    assert locked_versions(lock) == {"numpy": "2.2.6", "torch": "2.11.0"}
    assert lock_mismatches({"torch": "2.11.0+cu130", "numpy": "2.2.6"}, lock) == []
    assert lock_mismatches({"torch": "2.11.0+cu130", "numpy": "2.5.2"}, lock) == [
        "numpy 2.5.2 recorded, uv.lock pins 2.2.6"
    ]
    assert lock_mismatches({"numpy": "2.2.6"}, lock) == ["torch None recorded, uv.lock pins 2.11.0"]


LOCKED_RESULTS = sorted((REPO_ROOT / "benchmarks" / "results" / "nvidia-h200").glob("*.json")) + [
    REPO_ROOT / "benchmarks" / "results" / "nvidia-h100-80gb-hbm3" / name
    for name in (
        "inference_speculative.json",
        "inference_speculative_fp32_draft.json",
        "inference_w8a8.json",
        "inference_quantization.json",
        "kernels_matmul_decode.json",
    )
]


@pytest.mark.parametrize("result", LOCKED_RESULTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_gpu_results_were_recorded_in_the_locked_environment(result: Path) -> None:
    """The H200 results and the H100 ones recorded since the lock policy ran uv.lock's versions (the older
    H100 results predate it)."""
    record = json.loads(result.read_text())
    versions = record.get("env") or record.get("environment")
    assert lock_mismatches(versions) == []


def test_each_gpu_gets_its_own_results_folder() -> None:
    from common.cli import RESULTS_DIR, results_dir
    from common.environment import device_folder

    assert device_folder("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert device_folder("NVIDIA H200") == "nvidia-h200"
    assert results_dir(None) == RESULTS_DIR / device_folder()
    assert results_dir("elsewhere") == Path("elsewhere")


def test_without_a_gpu_the_results_folder_names_the_cpu(monkeypatch) -> None:
    from common.environment import device_folder

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    folder = device_folder()
    assert folder.startswith("cpu-") and folder.endswith(f"-{os.cpu_count()}-cores"), folder
