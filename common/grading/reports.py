"""What grading writes: Gradescope's `results.json` per submission, a CSV gradebook, a terminal table, TA logs.

`results.json` follows Gradescope's autograder format (score, execution_time, output, tests[] with name,
score, max_score, status, output, visibility), so the same file can be uploaded there. A task that was not
graded here (it needs a GPU runner, or the machine failed) carries no score, never a 0, and says why.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from common.grading.batch import SubmissionResult
from common.grading.harness import TaskResult
from common.grading.manifest import Task
from common.grading.sandbox import UNSANDBOXED


def _points(value: float) -> str:
    return f"{round(value, 4):g}"


def _task_output(result: TaskResult) -> str:
    lines = [result.detail] if result.detail else []
    for test in result.tests:
        name = test.nodeid.split("::", 1)[-1]
        lines.append(f"PASS {name}" if test.passed else f"FAIL {name}: {test.message}")
    return "\n".join(lines)


def results_json(result: SubmissionResult) -> dict:
    """One submission's grade in Gradescope's results.json format."""
    tests = []
    for task_result in result.tasks:
        entry = {
            "name": f"{task_result.task.id}: {task_result.task.title}",
            "max_score": task_result.task.points,
            "output": _task_output(task_result),
            "visibility": "visible",
        }
        if task_result.score is None:
            entry["output"] = f"{task_result.status}: not graded here. {entry['output']}".strip()
        else:
            entry["score"] = task_result.score
            entry["status"] = "passed" if task_result.score == task_result.task.points else "failed"
        tests.append(entry)
    notes = list(result.submission.notes)
    if _unsandboxed(result):
        notes.insert(0, UNSANDBOXED)
    if result.submission.refused:
        notes.insert(0, f"Submission {result.submission.refused}")
    ungraded = [t.task.id for t in result.tasks if t.score is None]
    if ungraded:
        notes.append(
            f"Not graded here: {', '.join(ungraded)} (see each task); the score covers the other tasks."
        )
    return {
        "score": result.score,
        "execution_time": round(result.duration_s, 1),
        "output": "\n".join(notes) or "All tasks graded.",
        "tests": tests,
        "extra_data": {"max_score_graded": result.max_score, "ungraded_tasks": ungraded},
    }


def _unsandboxed(result: SubmissionResult) -> bool:
    return any(task.isolation == UNSANDBOXED for task in result.tasks)


def write_submission(result: SubmissionResult, out_dir: Path) -> Path:
    """`out_dir/<name>/results.json` for the student, `out_dir/<name>/grader.log` for the TA."""
    folder = out_dir / result.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results_json(result), indent=2) + "\n")
    log = [f"submission: {result.submission.source}", *result.submission.notes]
    for task_result in result.tasks:
        log += [
            "",
            f"== task {task_result.task.id}: {task_result.status}, score {task_result.score}, "
            f"{task_result.duration_s:.1f} s, attempt {task_result.attempts}",
            _task_output(task_result),
            "-- output of the test process (last part) --",
            task_result.log,
        ]
    (folder / "grader.log").write_text("\n".join(log) + "\n")
    return folder / "results.json"


def write_gradebook(results: Sequence[SubmissionResult], path: Path) -> Path:
    """A CSV with one row per submission: each task's score (or why it has none), the total, notes."""
    if not results:
        raise ValueError("no results to write")
    tasks = [t.task for t in results[0].tasks]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["submission", *[f"{t.id} (/{t.points:g})" for t in tasks], "total", "max_graded", "notes"]
        )
        for result in results:
            cells = [_points(t.score) if t.score is not None else t.status for t in result.tasks]
            unsandboxed = UNSANDBOXED if _unsandboxed(result) else None
            notes = "; ".join(
                filter(None, [unsandboxed, result.submission.refused, *result.submission.notes])
            )
            writer.writerow([result.name, *cells, _points(result.score), _points(result.max_score), notes])
    return path


# Terminal tables must stay readable at 80 columns and when piped (rich then assumes 80): task columns are
# numbered, with a legend below; statuses are abbreviated; notes go under the table, not into a column.
# status -> (what its cell shows, what the legend says of it)
STATUS_SHORT = {
    "needs GPU runner": ("GPU", "needs a GPU runner, not graded here"),
    "infrastructure error": ("infra", "infrastructure error, not scored"),
}


def add_task_columns(table: Table, tasks: Sequence[Task]) -> None:
    """One narrow, right-aligned column per task, headed by its number and points ("3 /1.5")."""
    for number, task in enumerate(tasks, 1):
        table.add_column(f"{number}\n/{task.points:g}", justify="right", no_wrap=True)


def task_cell(result: TaskResult) -> str:
    """A task's points, coloured (full green, zero red, partial yellow), or its short status."""
    if result.score is None:
        short = STATUS_SHORT[result.status][0] if result.status in STATUS_SHORT else result.status
        return f"[yellow]{short}[/yellow]"
    colour = "green" if result.score == result.task.points else ("red" if result.score == 0 else "yellow")
    return f"[{colour}]{result.score:.3g}[/{colour}]"


def print_legend(console: Console, tasks: Sequence[Task], results: Sequence[Sequence[TaskResult]]) -> None:
    """What the numbered columns and the short statuses mean."""
    console.print(
        "tasks: " + ", ".join(f"{n} {escape(t.id)}" for n, t in enumerate(tasks, 1)), soft_wrap=False
    )
    shown = {STATUS_SHORT[t.status] for row in results for t in row if t.status in STATUS_SHORT}
    for short, meaning in sorted(shown):
        console.print(f"{short}: {meaning}")


def print_table(results: Sequence[SubmissionResult], console: Console | None = None) -> None:
    """The batch at a glance: a row per submission, a column per task; notes below."""
    console = console or Console()
    if not results:
        return
    tasks = [t.task for t in results[0].tasks]
    unsandboxed = any(_unsandboxed(result) for result in results)
    table = Table(
        title=f"{len(results)} submission(s)"
        + (f" [bold red]{UNSANDBOXED}[/bold red]" if unsandboxed else "")
    )
    table.add_column("submission", overflow="fold")
    add_task_columns(table, tasks)
    table.add_column("total", justify="right", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    notes = []
    for result in results:
        # The name and the notes (file names) come from the student: plain text, never rich markup.
        table.add_row(
            escape(result.name),
            *(task_cell(t) for t in result.tasks),
            f"{result.score:g}/{result.max_score:g}",
            f"{result.duration_s:.0f} s",
        )
        note = result.submission.refused or "; ".join(result.submission.notes)
        if _unsandboxed(result):
            note = f"{UNSANDBOXED}; {note}"
        if note:
            notes.append(f"{escape(result.name)}: {escape(note)}")
    console.print(table)
    print_legend(console, tasks, [r.tasks for r in results])
    if notes:
        console.print("notes:")
        for note in notes:
            console.print(f"  {note}")
