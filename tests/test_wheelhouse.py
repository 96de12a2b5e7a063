"""effdl wheelhouse: the locked wheels for an offline runner, chosen under the runner's markers and tags."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from common import wheelhouse
from common.weeks import REPO_ROOT
from common.wheelhouse import Wheel, WheelhouseError

LOCK = REPO_ROOT / "uv.lock"


def wheel_entry(filename: str, size: int = 1) -> dict:
    return {"url": f"https://files.example/{filename}", "hash": "sha256:" + "0" * 64, "size": size}


def package(name: str, version: str, *files: str, **fields) -> dict:
    wheels = [wheel_entry(file) for file in files]
    return {"name": name, "version": version, "source": {"registry": "x"}, "wheels": wheels, **fields}


TOY_LOCK = {
    "package": [
        {"name": "course", "version": "0.1", "source": {"editable": "."}, "dependencies": [
            {"name": "alpha"},
            {"name": "beta", "version": "2.0", "marker": "python_full_version >= '3.12'"},
            {"name": "beta", "version": "1.0", "marker": "python_full_version < '3.12'"},
            {"name": "macos-only", "marker": "sys_platform == 'darwin'"},
            {"name": "gamma", "extra": ["fast"]},
        ]},
        package("alpha", "1.0", "alpha-1.0-py3-none-any.whl", dependencies=[{"name": "course"}]),
        package("beta", "1.0", "beta-1.0-py3-none-any.whl"),
        package("beta", "2.0", "beta-2.0-py3-none-any.whl"),
        package("macos-only", "1.0", "macos_only-1.0-cp312-cp312-macosx_11_0_arm64.whl"),
        package("gamma", "1.0", "gamma-1.0-py3-none-any.whl",
                **{"optional-dependencies": {"fast": [{"name": "delta"}], "slow": [{"name": "epsilon"}]}}),
        package("delta", "1.0", "delta-1.0-py3-none-any.whl"),
        package("epsilon", "1.0", "epsilon-1.0-py3-none-any.whl"),
    ]
}  # fmt: skip


def names(python: str) -> list[tuple[str, str]]:
    chosen = wheelhouse.locked_packages(TOY_LOCK, wheelhouse.target_environment(python))
    return [(p["name"], p["version"]) for p in chosen]


def test_dependencies_follow_the_runners_markers_versions_and_extras() -> None:
    # A cycle back to the project ends; the darwin-only package and the unused extra are left out.
    assert names("3.12") == [("alpha", "1.0"), ("beta", "2.0"), ("delta", "1.0"), ("gamma", "1.0")]
    assert ("beta", "1.0") in names("3.11.7")


def test_the_best_wheel_for_the_runner_is_picked() -> None:
    files = (
        "numpy-2.2.6-cp312-cp312-macosx_14_0_arm64.whl",
        "numpy-2.2.6-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "numpy-2.2.6-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "numpy-2.2.6-cp312-cp312-musllinux_1_2_x86_64.whl",
    )
    chosen = wheelhouse.pick_wheel(package("numpy", "2.2.6", *files), wheelhouse.target_tags("3.12"))
    assert chosen.filename == files[2]
    # A wheel needing a newer glibc than the runner's is not installable there.
    newer = package("torch", "2.11.0", "torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl")
    with pytest.raises(WheelhouseError, match="no wheel of torch 2.11.0 for this runner"):
        wheelhouse.pick_wheel(newer, wheelhouse.target_tags("3.12", glibc="2.17"))


def test_a_bad_python_version_is_a_clear_error() -> None:
    with pytest.raises(WheelhouseError, match="--python takes a version such as 3.12"):
        wheelhouse.target_environment("python3")


def test_the_real_lock_resolves_for_each_supported_python() -> None:
    """Every package once, the version uv.lock resolved for that Python, and a wheel for each."""
    for python, contourpy in (("3.11", "1.3.3"), ("3.12", "1.4.0")):
        wheels = wheelhouse.plan(LOCK, python)
        by_name = {w.name: w for w in wheels}
        assert len(by_name) == len(wheels)
        assert by_name["contourpy"].version == contourpy
        assert by_name["torch"].filename.endswith(f"-cp{python.replace('.', '')}-manylinux_2_28_x86_64.whl")
        assert {"numpy", "triton", "jupytext", "pytest"} <= by_name.keys()
        assert "pywin32" not in by_name and "appnope" not in by_name  # other platforms' packages
        # Hydra's parser runtime has no wheel anywhere: its sdist comes, to be built into one.
        assert by_name["antlr4-python3-runtime"].filename.endswith(".tar.gz")
        assert [w.name for w in wheels if w.is_source] == ["antlr4-python3-runtime"]


def test_skipped_packages_are_left_out() -> None:
    wheels = wheelhouse.plan(LOCK, "3.12", skip=["torch", "Triton", "nvidia-*"])
    names_left = {w.name for w in wheels}
    assert not {"torch", "triton"} & names_left
    assert not any(name.startswith("nvidia-") for name in names_left)
    assert "torchvision" in names_left


def local_wheel(tmp_path: Path, content: bytes) -> Wheel:
    source = tmp_path / "source" / "tiny-1.0-py3-none-any.whl"
    source.parent.mkdir()
    source.write_bytes(content)
    return Wheel("tiny", "1.0", source.as_uri(), hashlib.sha256(content).hexdigest(), len(content))


def test_download_checks_size_and_sha256(tmp_path: Path) -> None:
    wheel = local_wheel(tmp_path, b"a wheel's bytes")
    out = tmp_path / "out"
    out.mkdir()
    assert wheelhouse.download(wheel, out).read_bytes() == b"a wheel's bytes"
    tampered = Wheel(wheel.name, wheel.version, wheel.url, "f" * 64, wheel.size)
    (out / wheel.filename).unlink()
    with pytest.raises(WheelhouseError, match="nothing was kept"):
        wheelhouse.download(tampered, out)
    assert list(out.iterdir()) == []


def test_offline_install_from_a_wheelhouse(tmp_path: Path) -> None:
    """Locked wheels downloaded from their index, then installed into a fresh venv with no index; the one
    source-only package comes as a wheel built from its checked sdist on the connected machine."""
    wanted = {"iniconfig", "pluggy", "antlr4-python3-runtime"}
    wheels = [w for w in wheelhouse.plan(LOCK, f"{sys.version_info.major}.{sys.version_info.minor}")
              if w.name in wanted]  # fmt: skip
    assert {w.name for w in wheels} == wanted
    house = tmp_path / "wheels"
    house.mkdir()
    try:
        for wheel in wheels:
            wheelhouse.download(wheel, house)
    except OSError as error:
        pytest.fail(f"downloading from the package index failed ({error}); this test needs PyPI's file host")
    requirements = wheelhouse.write_requirements(wheels, house)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--find-links",
            house,
            "-r",
            requirements,
        ],
        check=True,
    )
    versions = subprocess.run(
        [python, "-c", "import importlib.metadata as m; "
         "print(*(m.version(n) for n in ('antlr4-python3-runtime', 'iniconfig', 'pluggy')))"],
        check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    assert versions == [w.version for w in sorted(wheels, key=lambda w: w.name)]
