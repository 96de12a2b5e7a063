"""Helpers for the week-2 tests: the example project, copied where it may write, run without a network."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from common.weeks import REPO_ROOT

PROJECT = REPO_ROOT / "week02_management_and_testing" / "example_project"
# What a copy of the project needs; the rest (outputs/, dvc-remote/, caches) is made by running it.
SOURCES = ("classifier", "conf", "tests", ".dvc", ".dvcignore", "dvc.yaml", "params.yaml", "conftest.py",
           "pytest.ini", ".coveragerc")  # fmt: skip


def copy_project(destination: Path) -> Path:
    """A fresh copy of the project's sources in destination, nothing generated, no DVC cache."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in SOURCES:
        source = PROJECT / name
        if source.is_dir():
            shutil.copytree(
                source, destination / name, ignore=shutil.ignore_patterns("__pycache__", "cache", "tmp")
            )
        else:
            shutil.copy2(source, destination / name)
    return destination


def offline_env() -> dict[str, str]:
    """The environment of every command: the course's Python first on PATH (DVC's stages call `python`),
    DVC's analytics and W&B's uploads off, one compute thread per process (toy sizes; xdist shares cores)."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1",
    }


@cache
def _no_network_prefix() -> tuple[str, ...] | None:
    """A command prefix that runs a program in a network namespace of its own (only loopback), or None."""
    candidates = [("bwrap", "--unshare-net", "--bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--")]
    if os.geteuid() == 0:
        candidates.append(("unshare", "--net", "--"))
    for prefix in candidates:
        if shutil.which(prefix[0]) is None:
            continue
        probe = [*prefix, sys.executable, "-c", "import socket; print(len(socket.if_nameindex()))"]
        done = subprocess.run(probe, capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip() == "1":  # loopback is the only interface
            return prefix
    return None


def run_offline(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run command in cwd with no network at all: what needs one fails instead of reaching out.

    Skips the calling test, with the reason, where neither bwrap nor unshare can make a network namespace.
    """
    prefix = _no_network_prefix()
    if prefix is None:
        pytest.skip("needs bwrap (apt-get install bubblewrap) or root for unshare, to run without a network")
    return subprocess.run(
        [*prefix, *command],
        cwd=cwd,
        env={**offline_env(), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]
