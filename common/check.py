"""`effdl check`: before the semester, prove on the machine at hand that the course works here.

Every seminar runs top to bottom (small sizes), every slide deck builds, and every grader passes its
self-test (reference full marks, starter zero, every mutant caught). One table says what passed, how long
it took and, for what failed, why. A student release has no hidden tests, so its graders are not checked.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common.errors import EffdlError
from common.weeks import REPO_ROOT, Week

__all__ = ["Check", "check_course", "course_checks", "run_checks"]


@dataclass(frozen=True)
class Check:
    """One thing to prove: run() returns a one-line detail, or raises EffdlError saying what went wrong."""

    name: str  # the week or assignment
    kind: str  # "seminar (small)", "slides" or "grader self-test"
    run: Callable[[], str]


def course_checks(out_dir: Path) -> list[Check]:
    """Every seminar (small sizes), every slide deck and every grader self-test, writing outputs to out_dir."""
    from common import notebooks, slides
    from common.grading.manifest import assignment_names, find_assignment
    from common.grading.selftest import selftest_summary
    from common.weeks import weeks_with_seminar, weeks_with_slides

    def seminar(week: Week) -> str:
        return str(notebooks.execute(week, small=True, out_dir=out_dir).path)

    checks = [Check(week.name, "seminar (small)", lambda w=week: seminar(w)) for week in weeks_with_seminar()]
    checks += [
        Check(week.name, "slides", lambda w=week: f"{slides.build(w, out_dir).n_slides} slides")
        for week in weeks_with_slides()
    ]
    checks += [
        Check(name, "grader self-test", lambda n=name: selftest_summary(find_assignment(n)))
        for name in assignment_names()
        if (REPO_ROOT / "assignments" / name / "tests" / "hidden").is_dir()  # absent from a student release
    ]
    return checks


def run_checks(checks: Sequence[Check], console: Console, title: str) -> int:
    """Run each check in turn, print one table row per check; return how many failed."""
    table = Table(title=title)
    for column in ("week", "check", "result", "time", "detail"):
        table.add_column(column)
    failures = 0
    for check in checks:
        start = time.perf_counter()
        with console.status(f"{check.name}: {check.kind}"):
            try:
                detail, ok = check.run(), True
            except EffdlError as error:
                detail, ok = str(error), False
        failures += not ok
        result = "[green]ok[/green]" if ok else "[red]FAILED[/red]"
        table.add_row(check.name, check.kind, result, f"{time.perf_counter() - start:.0f} s", detail)
    console.print(table)
    return failures


def check_course(out_dir: Path | None = None, console: Console | None = None) -> int:
    """Run every check of the course here; return the exit status (0: all passed, 1: some failed)."""
    console = console or Console()
    out_dir = out_dir or Path(tempfile.mkdtemp(prefix="effdl-check-"))
    checks = course_checks(out_dir)
    failures = run_checks(checks, console, f"effdl check ({len(checks)} checks; outputs in {out_dir})")
    return 1 if failures else 0
