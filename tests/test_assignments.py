"""Every assignment's grader is proven (`effdl selftest`), and the student release is safe and fails loudly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from common.grading.manifest import assignment_names, find_assignment
from common.grading.release import ReleaseError, build_release
from common.grading.selftest import selftest
from common.weeks import REPO_ROOT

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the grading sandbox runs on Linux"
)
ASSIGNMENTS = assignment_names()


def _verdicts_ok(verdicts) -> None:
    wrong = {v.variant: v.problems for v in verdicts if not v.ok}
    assert not wrong, wrong


@pytest.mark.slow
@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_selftest_on_cpu(name: str) -> None:
    verdicts = selftest(find_assignment(name), jobs=2, console=Console(quiet=True))
    _verdicts_ok(verdicts)
    assert {v.variant for v in verdicts} >= {"reference", "starter"}
    assert len(verdicts) - 2 == len(find_assignment(name).mutants), "every mutant must be tried"


@pytest.mark.gpu
@pytest.mark.parametrize("name", ASSIGNMENTS)
def test_selftest_of_gpu_tasks(name: str) -> None:
    assignment = find_assignment(name)
    if not any(task.gpus for task in assignment.tasks):
        pytest.skip(f"{name} has no GPU task")
    verdicts = selftest(assignment, jobs=1, only_gpu_tasks=True, console=Console(quiet=True))
    _verdicts_ok(verdicts)
    graded = [t for v in verdicts for t in v.result.tasks if t.task.gpus]
    assert graded and all(t.status == "graded" for t in graded), [
        (t.task.id, t.status, t.detail) for t in graded
    ]


@pytest.mark.slow
def test_release_is_safe_and_its_public_tests_fail_with_not_implemented(tmp_path: Path) -> None:
    out = tmp_path / "student"
    report = build_release(out)
    assert report.stubs > 0 and set(report.public_tests) == set(ASSIGNMENTS)
    assert all(count > 0 for count in report.public_tests.values())
    for name in ASSIGNMENTS:
        assert not (out / "assignments" / name / "tests" / "hidden").exists()
        assert not (out / "assignments" / name / "mutants").exists()
        assert (out / "assignments" / name / "tests" / "public").is_dir()
        hidden_names = {
            p.name for p in (REPO_ROOT / "assignments" / name / "tests" / "hidden").glob("test_*.py")
        }
        assert not any(p.name in hidden_names for p in out.rglob("*.py"))
    leftover = [p for p in out.glob("assignments/*/src/**/*.py") if "BEGIN SOLUTION" in p.read_text()]
    assert leftover == []
    log = subprocess.run(
        ["git", "log", "--oneline"], cwd=out, capture_output=True, text=True, check=True
    ).stdout
    assert len(log.splitlines()) == 1, "the release starts a fresh history"
    assert (out / "common" / "grading" / "harness.py").is_file() and (out / "README.md").is_file()


def test_release_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("students' work")
    with pytest.raises(ReleaseError, match="exists and is not empty"):
        build_release(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "students' work"
