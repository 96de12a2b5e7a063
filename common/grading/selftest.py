"""`effdl selftest`: prove a grader before it grades anyone.

A grader is only as good as what it rejects. Graded with the same harness as students:

- the reference solution must score full marks on every task and pass every public test;
- the starter (solution blocks stubbed) must score zero, and each public test must fail with the stub's
  `NotImplementedError`, never an import error (in a bug hunt, whose starter is the program with its planted
  bugs, with an `AssertionError`);
- every mutant must lose points on each task it targets, and keep full marks on the others (with
  `mutants_on_targets_only`, as in the course's CI, each mutant is graded on the tasks it targets and nothing
  else: the same proof that the grader catches it, at a fraction of the sandboxed runs).

Tasks that need a GPU are checked only where a GPU is present (elsewhere they show `needs GPU runner`);
with `--gpu-only` a GPU task that could not run is a failure, and so is an infrastructure error anywhere:
a self-test that scored nothing has proven nothing.
The public tests run as students run them (`public`), on a copy of the assignment with the variant's `src/`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common.errors import EffdlError
from common.grading.batch import SubmissionResult, grade_batch
from common.grading.grade import task_progress
from common.grading.harness import GraderSetupError, GradingContext, TaskResult, build_src
from common.grading.intake import Submission
from common.grading.manifest import Assignment, Mutant, Task, require_hidden_tests
from common.grading.public import PublicCase, run_public_tests, starter_problems
from common.grading.reports import add_task_columns, print_legend, task_cell
from common.grading.solutions import Transform, apply_mutant, reference_source, starter_source


class SelftestFailedError(EffdlError):
    """The grader gave some variant a grade it must not: the message lists each one and why."""


@dataclass
class Verdict:
    """One variant's grade and whether it is what the grader must give."""

    variant: str
    expectation: str
    result: SubmissionResult
    problems: list[str] = field(default_factory=list)
    public: list[PublicCase] | None = None  # the public tests' outcomes (reference and starter only)

    @property
    def ok(self) -> bool:
        return not self.problems


def variant_files(assignment: Assignment, transform: Transform) -> dict[str, str]:
    """The submitted files of the reference passed through `transform` (to a starter, or to the reference)."""
    return {path: transform((assignment.src / path).read_text(), f"src/{path}") for path in assignment.submit}


def _submission(assignment: Assignment, name: str, files: dict[str, str]) -> Submission:
    return Submission(name=name, source=assignment.root, files={p: t.encode() for p, t in files.items()})


def _graded(result: SubmissionResult) -> list[TaskResult]:
    return [t for t in result.tasks if t.score is not None]


def _unscored(result: SubmissionResult, only_gpu_tasks: bool) -> list[str]:
    """Tasks the self-test could not score: an infrastructure error proves nothing about the grader; a GPU
    task left to a GPU runner is fine on a CPU, but not when the GPU tasks are what was asked for."""
    return [
        f"{t.task.id}: {t.status} ({t.detail})"
        for t in result.tasks
        if t.status == "infrastructure error" or (only_gpu_tasks and t.score is None)
    ]


def _check_reference(result: SubmissionResult, public: list[PublicCase] | None) -> list[str]:
    problems = []
    for t in _graded(result):
        if t.score != t.task.points:
            failed = [o for o in t.tests if not o.passed][:2]
            reasons = "; ".join(f"{o.nodeid.split('::')[-1]}: {o.message}" for o in failed)
            problems.append(f"{t.task.id}: {t.score:g}/{t.task.points:g} ({t.detail}) {reasons}")
    if public is not None:
        problems += [
            f"public {c.name} {c.outcome}: {c.message[:200]}" for c in public if c.outcome != "passed"
        ][:3]
        problems += [] if public else ["no public test ran"]
    return problems


def _check_starter(result: SubmissionResult, public: list[PublicCase] | None, failure: str) -> list[str]:
    problems = []
    for t in _graded(result):
        if t.score != 0:
            passing = [o.nodeid.split("::")[-1] for o in t.tests if o.passed][:3]
            problems.append(f"{t.task.id}: {t.score:g} points, passing {', '.join(passing)}")
    if public is not None:
        problems += [f"public {problem}" for problem in starter_problems(public, failure)][:3]
        problems += [] if public else ["no public test ran"]
    return problems


def _check_mutant(mutant: Mutant, result: SubmissionResult) -> list[str]:
    problems = []
    for t in _graded(result):
        if t.task.id in mutant.targets and t.score == t.task.points:
            problems.append(f"not caught by {t.task.id} ({t.detail})")
        elif t.task.id not in mutant.targets and t.score != t.task.points:
            problems.append(f"also loses points on untargeted task {t.task.id} ({t.detail})")
    return problems


def _require_gpus(assignment: Assignment, gpus: Sequence[int] | None) -> None:
    """Stop before grading anything when the GPU tasks cannot run here (`--gpu-only` on too small a machine)."""
    import torch

    needed = max((t.gpus for t in assignment.tasks), default=0)
    have = torch.cuda.device_count() if gpus is None else len(gpus)
    if needed == 0:
        raise GraderSetupError(f"{assignment.name} has no GPU task: run the self-test without --gpu-only")
    if have < needed:
        raise GraderSetupError(
            f"{assignment.name}: its GPU tasks need up to {needed} GPU(s) and this machine has {have or 'none'}; "
            "run the --gpu-only self-test on a GPU runner"
        )


def _public_outcomes(assignment: Assignment, transform: Transform, workdir: Path) -> list[PublicCase]:
    """The public tests on a copy of the assignment (public tests and `src/` only) with `transform`ed sources."""
    tree = Path(tempfile.mkdtemp(prefix="public-", dir=workdir))
    shutil.copytree(assignment.root / "tests" / "public", tree / "tests" / "public")
    build_src(assignment, tree / "src", transform)
    return run_public_tests(tree)


def selftest(
    assignment: Assignment,
    jobs: int = 2,
    gpus: Sequence[int] | None = None,
    only_gpu_tasks: bool = False,
    console: Console | None = None,
    mutants_on_targets_only: bool = False,
) -> list[Verdict]:
    """Grade the reference, the starter and every mutant; print a table; return the verdicts."""
    require_hidden_tests(assignment, "effdl selftest")
    console = console or Console()
    task_ids = [t.id for t in assignment.tasks if t.gpus or not only_gpu_tasks]
    if only_gpu_tasks:
        _require_gpus(assignment, gpus)
    reference = variant_files(assignment, reference_source)
    variants = [
        ("reference", "full marks, public tests pass", _submission(assignment, "reference", reference)),
        ("starter", f"zero; public tests fail with {assignment.starter_failure}",
         _submission(assignment, "starter", variant_files(assignment, starter_source))),
    ]  # fmt: skip
    mutants = [m for m in assignment.mutants if set(m.targets) & set(task_ids)]
    for mutant in mutants:
        expectation = f"loses points on {', '.join(mutant.targets)}"
        variants.append(
            (mutant.name, expectation, _submission(assignment, mutant.name, apply_mutant(reference, mutant)))
        )

    tasks = tuple(t for t in assignment.tasks if t.id in task_ids)
    graded_on = {name: tasks for name, _, _ in variants}
    if mutants_on_targets_only:
        graded_on |= {m.name: tuple(t for t in tasks if t.id in m.targets) for m in mutants}
    with console.status(f"{assignment.name}: checking the sandbox and collecting the hidden tests"):
        context = GradingContext.prepare(replace(assignment, tasks=tasks))
    try:
        public = {}
        if not only_gpu_tasks:
            with console.status(f"{assignment.name}: the public tests on the reference and the starter"):
                for name, transform in (("reference", reference_source), ("starter", starter_source)):
                    public[name] = _public_outcomes(assignment, transform, context.workdir)
        label = f"self-test: {len(variants)} variants"
        with task_progress(console, sum(map(len, graded_on.values())), label) as done:
            results = _grade_each_on_its_tasks(context, variants, graded_on, jobs, gpus, done)
    finally:
        shutil.rmtree(context.workdir, ignore_errors=True)
    verdicts = []
    for (name, expectation, _), result in zip(variants, results, strict=True):
        if name == "reference":
            problems = _check_reference(result, public.get(name))
        elif name == "starter":
            problems = _check_starter(result, public.get(name), assignment.starter_failure)
        else:
            problems = _check_mutant(next(m for m in mutants if m.name == name), result)
        problems = _unscored(result, only_gpu_tasks) + problems
        verdicts.append(Verdict(name, expectation, result, problems, public.get(name)))
    _print(verdicts, list(tasks), console)
    return verdicts


def _grade_each_on_its_tasks(
    context: GradingContext,
    variants: list[tuple[str, str, Submission]],
    graded_on: dict[str, tuple[Task, ...]],
    jobs: int,
    gpus: Sequence[int] | None,
    on_task_done: Callable[[str, TaskResult], None],
) -> list[SubmissionResult]:
    """Grade every variant on the tasks `graded_on` names for it: one batch per set of tasks, sharing the
    prepared context (its sandbox check, starter and collected hidden tests); results in variant order."""
    by_tasks: dict[tuple[str, ...], list[int]] = {}
    for index, (name, _, _) in enumerate(variants):
        by_tasks.setdefault(tuple(t.id for t in graded_on[name]), []).append(index)
    results: list[SubmissionResult | None] = [None] * len(variants)
    for indices in by_tasks.values():
        tasks = graded_on[variants[indices[0]][0]]
        narrowed = replace(context, assignment=replace(context.assignment, tasks=tasks))
        batch = grade_batch(narrowed, [variants[i][2] for i in indices], jobs, gpus, on_task_done)
        for index, result in zip(indices, batch, strict=True):
            results[index] = result
    return results


def _print(verdicts: list[Verdict], tasks: list[Task], console: Console) -> None:
    table = Table(title="grader self-test (points per task)")
    table.add_column("variant", overflow="fold")
    add_task_columns(table, tasks)
    table.add_column("public\ntests", justify="right", no_wrap=True)
    table.add_column("verdict", overflow="fold")
    for verdict in verdicts:
        public = verdict.public or []
        passed = f"{sum(c.outcome == 'passed' for c in public)}/{len(public)}" if public else "-"
        outcome = "[green]ok[/green]" if verdict.ok else "[red]WRONG[/red]: " + "; ".join(verdict.problems)
        graded = {t.task.id: t for t in verdict.result.tasks}
        cells = [task_cell(graded[t.id]) if t.id in graded else "[dim]-[/dim]" for t in tasks]
        table.add_row(verdict.variant, *cells, passed, f"{outcome} ({verdict.expectation})")
    console.print(table)
    print_legend(console, tasks, [v.result.tasks for v in verdicts])


def summary(verdicts: Sequence[Verdict]) -> str:
    """One line saying what a passed self-test proved; SelftestFailedError listing every wrong verdict."""
    wrong = [f"{v.variant}: {'; '.join(v.problems)}" for v in verdicts if not v.ok]
    if wrong:
        raise SelftestFailedError(" | ".join(wrong))
    mutants = sum(v.variant not in ("reference", "starter") for v in verdicts)
    return f"reference full, starter 0, {mutants} mutants caught"


def selftest_summary(assignment: Assignment, jobs: int = 2) -> str:
    """Run a grader self-test without printing (for `effdl check`); return or raise its summary()."""
    return summary(selftest(assignment, jobs=jobs, console=Console(quiet=True)))
