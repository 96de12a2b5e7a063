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
from rich.markup import escape
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
    """Run each check in turn, print a line as each one ends (a log when piped, where a spinner shows
    nothing), then one table row per check; return how many failed."""
    table = Table(title=title)
    for column in ("week", "check", "result", "time"):
        table.add_column(column, overflow="fold")
    table.add_column("detail", overflow="fold", ratio=1)  # long paths and messages wrap, never cut
    failures = 0
    for i, check in enumerate(checks, 1):
        start = time.perf_counter()
        with console.status(f"{check.name}: {check.kind}"):
            try:
                detail, ok = check.run(), True
            except EffdlError as error:
                detail, ok = str(error), False
        failures += not ok
        took = f"{time.perf_counter() - start:.0f} s"
        console.print(
            f"[{i}/{len(checks)}] {check.name}, {check.kind}: {'ok' if ok else 'FAILED'} ({took})",
            markup=False,
        )
        result = "[green]ok[/green]" if ok else "[red]FAILED[/red]"
        table.add_row(escape(check.name), check.kind, result, took, escape(detail))
    console.print(table)
    return failures


def check_course(out_dir: Path | None = None, console: Console | None = None) -> int:
    """Run every check of the course here; return the exit status (0: all passed, 1: some failed).

    Without out_dir the outputs go to a temporary folder that is removed at the end.
    """
    console = console or Console()
    with tempfile.TemporaryDirectory(prefix="effdl-check-") as scratch:
        folder = out_dir or Path(scratch)
        checks = course_checks(folder)
        where = f"outputs in {folder}" if out_dir else "outputs removed; keep them with --out DIR"
        failures = run_checks(checks, console, f"effdl check ({len(checks)} checks; {where})")
    return 1 if failures else 0
