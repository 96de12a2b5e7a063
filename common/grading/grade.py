"""`effdl grade`: read a batch of submissions, grade them with a progress bar, write every report."""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from common.errors import EffdlError
from common.grading.batch import SubmissionResult, grade_batch, unique_names
from common.grading.harness import GradingContext, TaskResult
from common.grading.intake import Submission, SubmissionNotFoundError, read_submission
from common.grading.manifest import Assignment, require_hidden_tests
from common.grading.reports import print_table, write_gradebook, write_submission
from common.grading.shard import Shard, write_record


@contextmanager
def task_progress(console: Console, total: int, label: str):
    """A progress bar over (submission, task) pairs; yields the callback the batch calls per finished task."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[last]}", markup=False),  # a submission's name is the student's text
        console=console,
        transient=False,
    ) as progress:
        bar = progress.add_task(label, total=total, last="")

        def done(name: str, result: TaskResult) -> None:
            score = "-" if result.score is None else f"{result.score:g}"
            progress.update(bar, advance=1, last=f"{name}/{result.task.id}: {score}")

        yield done


def expand_submissions(paths: Sequence[Path], assignment: Assignment) -> list[Path]:
    """Each path is a submission (a zip, or a folder with the files) or a folder of such submissions."""
    declared = {PurePosixPath(path).name for path in assignment.submit}
    expanded: list[Path] = []
    for path in map(Path, paths):
        is_one = any((path / name).is_file() for name in declared) or (path / assignment.package).is_dir()
        if path.is_dir() and not is_one:
            expanded.extend(sorted(p for p in path.iterdir() if p.is_dir() or p.suffix == ".zip"))
        else:
            expanded.append(path)
    return expanded


def read_or_refuse(path: Path, assignment: Assignment, name: str) -> Submission:
    """read_submission, where any failure to read this one submission refuses it and the batch goes on.

    intake refuses what it knows to be unreadable; this catches what nobody foresaw. A path that does not
    exist is the TA's typo, not the student's fault: it still stops the run before anything is graded.
    """
    try:
        return read_submission(path, assignment, name)
    except SubmissionNotFoundError:
        raise
    except Exception as error:  # the reason goes into the refusal, not lost
        return Submission(name, Path(path), refused=f"refused: unreadable ({type(error).__name__}: {error})")


def grade(
    assignment: Assignment,
    paths: Sequence[Path],
    out_dir: Path,
    jobs: int = 1,
    gpus: Sequence[int] | None = None,
    console: Console | None = None,
    shard: Shard | None = None,
    sandboxed: bool = True,
) -> list[SubmissionResult]:
    """Grade submissions and write `out_dir/<name>/results.json`, `grader.log` and `out_dir/gradebook.csv`.

    shard: grade only that slice of the batch, and write `out_dir/shard.json` for `effdl gradebook merge`.
    sandboxed: False runs submissions without isolation (`--no-sandbox`); every report then says so.
    """
    require_hidden_tests(assignment, "effdl grade")
    console = console or Console()
    paths = expand_submissions(paths, assignment)
    batch = list(zip(paths, unique_names(paths), strict=True))  # names unique over the whole batch
    mine = shard.take(batch) if shard is not None else batch
    submissions: list[Submission] = [read_or_refuse(path, assignment, name) for path, name in mine]
    if not submissions:
        raise EffdlError(f"nothing to grade: {'this shard of ' if shard else ''}the batch has no submissions")
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with console.status(f"{assignment.name}: checking the sandbox and collecting the hidden tests"):
        context = GradingContext.prepare(assignment, out_dir / ".work", sandboxed=sandboxed)
    try:
        total = len(submissions) * len(assignment.tasks)
        with task_progress(
            console, total, f"grading {len(submissions)} submission(s), {jobs} at a time"
        ) as done:
            results = grade_batch(context, submissions, jobs=jobs, gpus=gpus, on_task_done=done)
    finally:
        shutil.rmtree(context.workdir, ignore_errors=True)
    for result in results:
        write_submission(result, out_dir)
    gradebook = write_gradebook(results, out_dir / "gradebook.csv")
    if shard is not None:
        write_record(out_dir, assignment.name, shard, [name for _, name in batch], [r.name for r in results])
    print_table(results, console)
    elapsed = time.monotonic() - start
    console.print(
        f"Gradebook: {gradebook}  ({elapsed:.0f} s for {len(results)} submission(s))", soft_wrap=True
    )
    console.print(f"Isolation: {context.isolation}", style=None if sandboxed else "bold red", soft_wrap=True)
    return results
