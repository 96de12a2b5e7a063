"""Running an assignment's public tests the way a student does: plain pytest, in process, on one `src/`.

The release checks that each public test fails with `NotImplementedError` on the starter; the self-test also
checks that each passes on the reference. Only instructors' code runs here (the reference, the starter, the
released starter), so there is no sandbox: submissions are never run through this module.
"""

from __future__ import annotations

import os
import tempfile
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

from common.grading.forkserver import run_pytest


@dataclass(frozen=True)
class PublicCase:
    """One public test's outcome: "passed", "failed", "error" (at import or setup) or "skipped"."""

    name: str
    outcome: str
    message: str = ""


def run_public_tests(assignment_dir: Path, timeout_s: float = 900) -> list[PublicCase]:
    """Run `assignment_dir/tests/public` against `assignment_dir/src`; one PublicCase per test.

    pytest is forked from the checker's warm server, with `src/` on its path as students have it."""
    with tempfile.TemporaryDirectory(prefix="effdl-public-") as tmp:
        junit = Path(tmp) / "public.xml"
        env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
        env.pop("PYTEST_ADDOPTS", None)
        argv = ["tests/public", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", "-o", "addopts=",
                "-o", f"pythonpath={assignment_dir / 'src'}"]  # fmt: skip
        run_pytest(argv, assignment_dir, env, Path(tmp) / "public.log", timeout_s)
        return read_junit(junit)


def read_junit(junit: Path) -> list[PublicCase]:
    """One PublicCase per test case of a pytest `--junitxml` report; none if pytest wrote no report."""
    if not junit.exists():
        return []
    cases = []
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}.{case.get('name')}"
        for outcome in ("failure", "error", "skipped"):
            element = case.find(outcome)
            if element is not None:
                kind = {"failure": "failed", "error": "error", "skipped": "skipped"}[outcome]
                cases.append(PublicCase(name, kind, element.get("message") or ""))
                break
        else:
            cases.append(PublicCase(name, "passed"))
    return cases


def starter_problems(cases: list[PublicCase], failure: str = "NotImplementedError") -> list[str]:
    """What is wrong with public tests run on a starter: each must fail with `failure` (the stubs'
    NotImplementedError, or AssertionError where the starter is a program with planted bugs)."""
    problems = []
    for case in cases:
        if case.outcome == "error":
            problems.append(f"{case.name} errors at import or setup")
        elif case.outcome != "failed":
            problems.append(f"{case.name} {case.outcome}")
        elif not case.message.startswith(failure):
            problems.append(f"{case.name} fails with {case.message[:120]!r}")
    return problems
