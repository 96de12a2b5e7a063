"""A wheelhouse: the exact wheels uv.lock pins, for a machine that cannot reach a package index.

The GPU nodes of a cluster usually have no internet. On a connected machine,

    effdl wheelhouse --out wheels --python 3.12          # what a Linux x86_64 runner with CPython 3.12 needs

reads uv.lock, follows the course's dependencies under the runner's environment markers (Python version,
Linux), picks for each pinned package the one wheel file of the lock that the runner can install, downloads
it from the URL in the lock and checks it against the lock's sha256. A package with no wheel at all comes as
its source archive, checked the same way and built into a wheel here (`uv build`). It writes `requirements.txt` beside the wheels. On the runner, with no index at all:

    python3.12 -m venv .venv
    .venv/bin/pip install --no-index --no-deps --find-links wheels -r wheels/requirements.txt

`--skip` leaves out packages the runner already has (a site-wide PyTorch: `--skip torch --skip triton
--skip 'nvidia-*' --skip 'cuda-*'`); they are left out of requirements.txt too.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import subprocess
import tempfile
import tomllib
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging import tags
from packaging.markers import Marker
from packaging.utils import canonicalize_name, parse_wheel_filename

from common.errors import EffdlError

CHUNK = 1 << 20


class WheelhouseError(EffdlError):
    """The lock has no wheel the runner can install, or a download failed its checks."""


@dataclass(frozen=True)
class Wheel:
    """One file of the lock: a package's wheel for the target machine, or its source archive where the lock
    has no wheel at all (antlr4-python3-runtime, which Hydra needs, ships only an sdist): `download` builds
    that into a wheel on the connected machine, so the runner installs wheels only."""

    name: str
    version: str
    url: str
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def is_source(self) -> bool:
        return not self.filename.endswith(".whl")


def target_environment(python: str) -> dict[str, str]:
    """PEP 508 marker values of a Linux x86_64 CPython runner; python is "3.12" or "3.12.3" (then exact)."""
    parts = python.split(".")
    if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts):
        raise WheelhouseError(f"--python takes a version such as 3.12 or 3.12.3, got {python!r}")
    major_minor = ".".join(parts[:2])
    return {
        "python_version": major_minor,
        "python_full_version": python if len(parts) == 3 else f"{major_minor}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "platform_release": "",
        "platform_version": "",
        "implementation_version": python if len(parts) == 3 else f"{major_minor}.0",
        "extra": "",
    }


def target_tags(python: str, glibc: str = "2.28") -> list[tags.Tag]:
    """Wheel tags a CPython runner on Linux x86_64 with this glibc accepts, best first."""
    major, minor = (int(p) for p in python.split(".")[:2])
    glibc_major, glibc_minor = (int(p) for p in glibc.split("."))
    platforms = [f"manylinux_{glibc_major}_{m}_x86_64" for m in range(glibc_minor, 4, -1)]
    legacy = {"manylinux_2_17_x86_64": "manylinux2014", "manylinux_2_12_x86_64": "manylinux2010",
              "manylinux_2_5_x86_64": "manylinux1"}  # fmt: skip
    platforms = [
        alias for p in platforms for alias in (p, f"{legacy[p]}_x86_64" if p in legacy else None) if alias
    ]
    platforms.append("linux_x86_64")
    interpreter = f"cp{major}{minor}"
    return [
        *tags.cpython_tags((major, minor), abis=[interpreter, "abi3", "none"], platforms=platforms),
        *tags.compatible_tags((major, minor), interpreter=interpreter, platforms=platforms),
    ]


def locked_packages(lock: dict[str, Any], environment: dict[str, str]) -> list[dict[str, Any]]:
    """The lock's packages the course installs on a machine with these markers, sorted by name.

    Follows dependencies from the project (the lock's editable or virtual package): an edge whose marker is
    false here is not taken; an edge naming a version picks that one of several locked versions; extras
    pull in the package's optional dependencies.
    """
    packages = lock["package"]
    roots = [p for p in packages if "editable" in p["source"] or "virtual" in p["source"]]
    if len(roots) != 1:
        raise WheelhouseError(f"uv.lock should hold one project package, found {len(roots)}")
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    visited: set[tuple[str, str, tuple[str, ...]]] = set()
    pending: list[tuple[dict[str, Any], tuple[str, ...]]] = [(roots[0], ())]
    while pending:
        package, extras = pending.pop()
        edges = list(package.get("dependencies", []))
        for extra in extras:
            edges += package.get("optional-dependencies", {}).get(extra, [])
        for edge in edges:
            if "marker" in edge and not Marker(edge["marker"]).evaluate(environment):
                continue
            matches = [p for p in packages if p["name"] == edge["name"]
                       and edge.get("version", p["version"]) == p["version"]]  # fmt: skip
            if len(matches) != 1:
                raise WheelhouseError(f"uv.lock: {edge['name']} resolves to {len(matches)} packages")
            target = matches[0]
            if target is roots[0]:  # a dependency cycle back to the project, which is not a wheel
                continue
            chosen[(target["name"], target["version"])] = target
            step = (target["name"], target["version"], tuple(edge.get("extra", [])))
            if step not in visited:
                visited.add(step)
                pending.append((target, step[2]))
    return sorted(chosen.values(), key=lambda p: p["name"])


def pick_wheel(package: dict[str, Any], accepted: list[tags.Tag]) -> Wheel:
    """The package's wheel whose best tag ranks highest among the accepted tags."""
    rank = {tag: i for i, tag in enumerate(accepted)}
    best: tuple[int, dict[str, Any]] | None = None
    for wheel in package.get("wheels", []):
        _, _, _, wheel_tags = parse_wheel_filename(wheel["url"].rsplit("/", 1)[-1])
        score = min((rank[t] for t in wheel_tags if t in rank), default=None)
        if score is not None and (best is None or score < best[0]):
            best = (score, wheel)
    if best is None and package.get("sdist") and not package.get("wheels"):
        best = (0, package["sdist"])  # no wheel for any machine: pure source, built by pip on the runner
    if best is None:
        raise WheelhouseError(
            f"uv.lock has no wheel of {package['name']} {package['version']} for this runner "
            f"(best tag wanted: {accepted[0]}); it would have to be built from source there"
        )
    wheel = best[1]
    algorithm, _, digest = wheel["hash"].partition(":")
    if algorithm != "sha256":
        raise WheelhouseError(f"uv.lock: {package['name']} has a {algorithm} hash; expected sha256")
    return Wheel(package["name"], package["version"], wheel["url"], digest, wheel["size"])


def plan(lock_file: Path, python: str, glibc: str = "2.28", skip: Iterable[str] = ()) -> list[Wheel]:
    """The wheels a runner with this Python and glibc needs, minus the skipped package name patterns."""
    with open(lock_file, "rb") as f:
        lock = tomllib.load(f)
    patterns = [canonicalize_name(p) if "*" not in p else p.lower() for p in skip]
    accepted = target_tags(python, glibc)
    return [
        pick_wheel(package, accepted)
        for package in locked_packages(lock, target_environment(python))
        if not any(fnmatch.fnmatch(canonicalize_name(package["name"]), p) for p in patterns)
    ]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download(wheel: Wheel, out_dir: Path) -> Path:
    """Fetch one wheel into out_dir (kept if already there and intact); refuse it if size or sha256 differ.
    A source archive is fetched into out_dir/sources the same way, then built into a wheel in out_dir."""
    if not wheel.is_source:
        return _fetch(wheel, out_dir)
    prefix = f"{canonicalize_name(wheel.name).replace('-', '_')}-{wheel.version}-"
    built = [p for p in out_dir.glob("*.whl") if p.name.lower().startswith(prefix)]
    if built:
        return built[0]
    (out_dir / "sources").mkdir(exist_ok=True)
    return build_wheel(_fetch(wheel, out_dir / "sources"), out_dir)


def build_wheel(sdist: Path, out_dir: Path) -> Path:
    """Build a checked source archive into a pure-Python wheel in out_dir with `uv build` (which fetches the
    build backend: this runs on the connected machine); refuse a wheel that only fits this machine."""
    uv = os.environ.get("UV") or shutil.which("uv")  # `uv run` names itself in UV
    if uv is None:
        raise WheelhouseError(f"{sdist.name} has no wheel in uv.lock; building one needs uv on PATH")
    with tempfile.TemporaryDirectory() as scratch:
        run = subprocess.run(
            [uv, "build", "--wheel", "--no-config", "--out-dir", scratch, str(sdist)],
            capture_output=True, text=True,
        )  # fmt: skip
        if run.returncode != 0:
            reason = (run.stderr.strip().splitlines() or [f"exit code {run.returncode}"])[-1]
            raise WheelhouseError(f"building a wheel from {sdist.name} failed: {reason}")
        (wheel,) = Path(scratch).glob("*.whl")
        if not wheel.name.endswith("-py3-none-any.whl"):
            raise WheelhouseError(
                f"{sdist.name} built {wheel.name}, which only fits this machine, not the runner"
            )
        return Path(shutil.move(wheel, out_dir / wheel.name))


def _fetch(wheel: Wheel, out_dir: Path) -> Path:
    path = out_dir / wheel.filename
    if path.is_file() and path.stat().st_size == wheel.size and _sha256(path) == wheel.sha256:
        return path
    partial = path.with_name(path.name + ".part")
    with urllib.request.urlopen(wheel.url, timeout=60) as response, open(partial, "wb") as f:
        while chunk := response.read(CHUNK):
            f.write(chunk)
    got_size, got_hash = partial.stat().st_size, _sha256(partial)
    if (got_size, got_hash) != (wheel.size, wheel.sha256):
        partial.unlink()
        raise WheelhouseError(
            f"{wheel.filename}: downloaded {got_size} bytes with sha256 {got_hash[:12]}..., uv.lock says "
            f"{wheel.size} bytes, {wheel.sha256[:12]}...; nothing was kept"
        )
    partial.replace(path)
    return path


def write_requirements(wheels: list[Wheel], out_dir: Path) -> Path:
    """requirements.txt of exact pins, for `pip install --no-index --no-deps --find-links DIR -r ...`."""
    path = out_dir / "requirements.txt"
    path.write_text("".join(f"{w.name}=={w.version}\n" for w in wheels))
    return path
