"""The GPU-runner check: `pytest -m gpu` without a GPU fails with one line instead of skipping everything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import selects_only_gpu_tests

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("markexpr", "gpu_run"),
    [
        ("gpu", True),
        ("gpu and not slow", True),
        ("(gpu or notebook) and not slow", True),
        ("", False),
        ("not gpu", False),
        ("slow", False),
        ("gpu or not gpu", False),
    ],
)
def test_which_marker_expressions_make_a_gpu_run(markexpr: str, gpu_run: bool) -> None:
    assert selects_only_gpu_tests(markexpr) == gpu_run


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU prints")
def test_pytest_m_gpu_fails_with_one_line_without_a_gpu() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "tests/test_tables.py"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and "sees no CUDA GPU" in errors[0], run.stdout + run.stderr
