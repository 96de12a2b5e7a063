"""Every assignment's grader is proven (`effdl selftest`). The student release is tested in test_release.py."""

from __future__ import annotations

import sys

import pytest
from rich.console import Console

from common.grading.manifest import assignment_names, find_assignment
from common.grading.selftest import selftest

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
