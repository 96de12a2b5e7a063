"""Grading one submission: the hidden tests in a trusted checker process, the submission in a sandboxed worker.

`GradingContext.prepare` does the per-assignment work once per batch: it checks that the sandbox works here,
builds the starter `src/` that every submission's tree starts from (missing files are graded as the stub),
and asks pytest which hidden tests each task has. Collection never involves a submission (the hidden tests
do not import it), so those ids are fixed: a test the checker does not report is not a pass.

`grade_submission` grades a submission's CPU tasks in one checker process, whose tasks share one sandbox
(one worker per task, forked from a template that has imported torch once), and each GPU task in a checker
process of its own, with a sandbox that sees only that task's GPUs. A task whose result is an infrastructure
fault (seen by the checker, never claimed by the submission) is graded once more.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import EffdlError
from common.grading.checker import MESSAGE_CHARS, CheckerConfig
from common.grading.forkserver import run_pytest
from common.grading.manifest import Assignment, Task
from common.grading.sandbox import ISOLATION, UNSANDBOXED, SandboxUnavailableError, probe
from common.grading.session import START_TIMEOUT_S
from common.grading.solutions import Transform, starter_source, transformed_tree

OUTPUT_TAIL_CHARS = 64 * 1024  # of the checker's and the sandbox's output, in the TA's log
CHECKER_MARGIN_S = 300.0  # the trusted side's own work (references, hypothesis) on top of the workers' time


class GraderSetupError(EffdlError):
    """The grader itself cannot run: hidden tests that do not collect, a sandbox that cannot start."""


@dataclass
class CaseOutcome:
    nodeid: str
    passed: bool
    message: str = ""


@dataclass
class TaskResult:
    """The grade of one task of one submission."""

    task: Task
    status: str  # "graded", "needs GPU runner", "infrastructure error"
    score: float | None
    tests: list[CaseOutcome] = field(default_factory=list)
    detail: str = ""
    duration_s: float = 0.0  # the submission's own time: its worker's, summed over the task's calls
    attempts: int = 1
    log: str = ""
    isolation: str = ""  # how the submission was isolated (UNSANDBOXED in every report if it was not)


@dataclass
class CheckerRun:
    """What one checker process reported: its JSON lines, its exit status and its own output."""

    records: list[dict]
    returncode: int | None  # None: killed at its timeout
    output: str

    def of_kind(self, kind: str) -> list[dict]:
        return [record for record in self.records if record.get("kind") == kind]


@dataclass
class GradingContext:
    """Per-assignment state shared by every submission of a batch."""

    assignment: Assignment
    workdir: Path
    starter: Path  # the starter's src/ folder
    expected: dict[str, list[str]]  # task id -> hidden test ids
    gpu_count: int
    sandboxed: bool = True

    @classmethod
    def prepare(
        cls,
        assignment: Assignment,
        workdir: Path | None = None,
        gpu_count: int | None = None,
        sandboxed: bool = True,
    ) -> GradingContext:
        """Check the sandbox, build the starter, collect the hidden tests; GraderSetupError if any fails."""
        if sandboxed:
            try:
                probe()
            except SandboxUnavailableError as error:
                raise GraderSetupError(
                    f"cannot sandbox submissions: {error}; or pass --no-sandbox to grade without isolation"
                ) from None
        own_workdir = workdir is None
        # Absolute: the checker's pytest runs in the assignment's folder, and is given paths inside workdir.
        workdir = Path(workdir or tempfile.mkdtemp(prefix="effdl-grade-")).resolve()
        try:
            (workdir / "runs").mkdir(parents=True, exist_ok=True)
            starter = build_src(assignment, workdir / "starter" / "src", starter_source)
            if gpu_count is None:
                import torch

                gpu_count = torch.cuda.device_count()
            context = cls(assignment, workdir, starter, {}, gpu_count, sandboxed)
            collected = context.collect([selection for task in assignment.tasks for selection in task.tests])
            context.expected = {t.id: [n for n in collected if t.selects(n)] for t in assignment.tasks}
            empty = [task_id for task_id, ids in context.expected.items() if not ids]
            if empty:
                raise GraderSetupError(f"{assignment.name}: tasks {empty} select no hidden tests")
        except BaseException:
            if own_workdir:  # a setup that failed leaves no temporary folder behind
                shutil.rmtree(workdir, ignore_errors=True)
            raise
        return context

    @property
    def isolation(self) -> str:
        return ISOLATION if self.sandboxed else UNSANDBOXED

    def collect(self, selections: list[str]) -> list[str]:
        """The test ids pytest collects for `selections` (no submission is involved)."""
        folder = Path(tempfile.mkdtemp(prefix="collect-", dir=self.workdir / "runs"))
        try:
            config = self.checker_config(folder, tasks=[])
            run = self.run_checker(config, ["--collect-only", *selections], timeout_s=600)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        collected = run.of_kind("collected")
        errors = [record["message"] for record in run.of_kind("collect_error")]
        if not collected or errors:
            detail = errors[0] if errors else run.output[-2000:]
            raise GraderSetupError(
                f"{self.assignment.name}: {' '.join(selections)} do not collect:\n{detail}"
            )
        return collected[0]["nodeids"]

    def checker_config(self, folder: Path, tasks: list[Task], **settings) -> CheckerConfig:
        """The settings of a checker process whose files go to `folder`."""
        return CheckerConfig(
            report=str(folder / "report.jsonl"),
            package=self.assignment.package,
            scenarios=str(self.assignment.root / "tests" / "hidden" / "scenarios"),
            tasks=tasks,
            scratch=str(folder / "scratch"),
            sandboxed=self.sandboxed,
            preload=list(self.assignment.worker_preload),
            cache=str(self.workdir / "isolated-runs"),
            **settings,
        )

    def run_checker(self, config: CheckerConfig, args: list[str], timeout_s: float) -> CheckerRun:
        """pytest with the checker plugin on the hidden tests, in the assignment folder (trusted: no sandbox),
        forked from the warm checker server."""
        report = Path(config.report)
        config_path = config.write(report.with_name("checker.json"))
        ini = report.with_name("pytest.ini")
        ini.write_text("[pytest]\n")
        env = {
            **os.environ,
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
            "CUDA_VISIBLE_DEVICES": ",".join(str(gpu) for gpu in config.gpus),
            "OMP_NUM_THREADS": str(config.threads),
        }
        argv = ["-p", "common.grading.checker", f"--grading-config={config_path}", "-p", "no:cacheprovider",
                "-c", str(ini), "--rootdir", str(self.assignment.root), "--assert=plain", "-q", "--no-header",
                "-rN", "--tb=short", "-W", "ignore::pytest.PytestAssertRewriteWarning", *args]  # fmt: skip
        output = report.with_name("checker.log")
        returncode = run_pytest(argv, self.assignment.root, env, output, timeout_s)
        records = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
        text = output.read_text(errors="replace") if output.exists() else ""
        return CheckerRun(records, returncode, text[-OUTPUT_TAIL_CHARS:])


def build_src(assignment: Assignment, dest: Path, transform: Transform) -> Path:
    """A copy of the assignment's `src/`, each file passed through `transform(text, where)`."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for relative, data in transformed_tree(assignment.src, transform).items():
        (dest / relative).parent.mkdir(parents=True, exist_ok=True)
        (dest / relative).write_bytes(data)
    return dest


def needs_gpu_runner(task: Task, gpu_count: int) -> TaskResult | None:
    """The "needs GPU runner" result of a task this machine has too few GPUs for; None if it has enough."""
    if task.gpus <= gpu_count:
        return None
    have = f"this machine has {gpu_count}" if gpu_count else "this machine has none"
    return TaskResult(task, "needs GPU runner", None, detail=f"needs {task.gpus} GPU(s); {have}")


def grade_tasks(
    context: GradingContext, files: dict[str, bytes], tasks: list[Task], gpus: list[int], threads: int
) -> list[TaskResult]:
    """Run `tasks`' hidden tests in one checker process (one sandbox) on the submitted files; a result each."""
    folder = Path(tempfile.mkdtemp(prefix="submission-", dir=context.workdir / "runs"))
    try:
        src = folder / "src"
        shutil.copytree(context.starter, src)
        for relative, data in files.items():
            (src / relative).write_bytes(data)
        config = context.checker_config(folder, tasks, src=str(src), gpus=gpus, threads=threads)
        timeout = sum(task.time_limit_s for task in tasks) + 2 * START_TIMEOUT_S + CHECKER_MARGIN_S
        run = context.run_checker(config, [selection for task in tasks for selection in task.tests], timeout)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return [score_task(context, task, run) for task in tasks]


def score_task(context: GradingContext, task: Task, run: CheckerRun) -> TaskResult:
    """Turn the checker's report into per-test outcomes and a score for `task`."""
    sandbox_output = "\n".join(record["text"] for record in run.of_kind("output"))
    log = f"[isolation: {context.isolation}]\n-- checker --\n{run.output}\n-- sandbox --\n{sandbox_output}"
    reported = {record["nodeid"]: record for record in run.of_kind("result")}
    stats = next((r for r in run.of_kind("task") if r["id"] == task.id), {})
    duration = stats.get("worker_s", 0.0)
    missing = [nodeid for nodeid in context.expected[task.id] if nodeid not in reported]
    infra = [
        f"{n.split('::')[-1]}: {reported[n]['infra']}"
        for n in context.expected[task.id]
        if reported.get(n, {}).get("infra")
    ]
    if missing:  # the checker is ours: if it stopped early, the machine or the grader failed, not the student
        status = "timed out" if run.returncode is None else f"exit code {run.returncode}"
        infra.insert(0, f"the checker process ended ({status}) before reporting {len(missing)} test(s)")
    outcomes = [
        CaseOutcome(n, bool(reported[n]["passed"]), str(reported[n]["message"])[:MESSAGE_CHARS])
        for n in context.expected[task.id]
        if n in reported
    ]
    if infra:
        return TaskResult(task, "infrastructure error", None, outcomes, detail="; ".join(infra[:3]),
                          duration_s=duration, log=log, isolation=context.isolation)  # fmt: skip
    passed, total = sum(o.passed for o in outcomes), len(outcomes)
    if task.partial_credit == "all_or_nothing":
        score = task.points if passed == total else 0.0
    else:
        score = round(task.points * passed / total, 4)
    detail = f"{passed}/{total} tests passed"
    if stats.get("timed_out"):
        detail += f"; time limit {task.time_limit_s:g} s exceeded"
    if stats.get("process_limit_hit"):
        detail += "; stopped for starting too many processes"
    return TaskResult(task, "graded", score, outcomes, detail=detail, duration_s=duration, log=log,
                      isolation=context.isolation)  # fmt: skip


def grade_submission(
    context: GradingContext,
    files: dict[str, bytes],
    acquire: Callable[[int], list[int]],
    release: Callable[[list[int]], None],
    threads: int,
    on_task_done: Callable[[TaskResult], None] = lambda result: None,
) -> list[TaskResult]:
    """Every task of the assignment on `files`, in the manifest's order; GPUs from `acquire`/`release`."""
    results: dict[str, TaskResult] = {}

    def record(batch: list[TaskResult], attempt: int) -> None:
        for result in batch:
            result.attempts = attempt
            results[result.task.id] = result
            if result.status != "infrastructure error" or attempt == 2:
                on_task_done(result)

    def run(tasks: list[Task], gpus: int) -> None:
        for attempt in (1, 2):
            taken = acquire(gpus)
            try:
                record(grade_tasks(context, files, tasks, taken, threads), attempt)
            finally:
                release(taken)
            tasks = [task for task in tasks if results[task.id].status == "infrastructure error"]
            if not tasks:
                return

    cpu_tasks = [task for task in context.assignment.tasks if task.gpus == 0]
    if cpu_tasks:
        run(cpu_tasks, 0)
    for task in context.assignment.tasks:
        if task.gpus:
            unrunnable = needs_gpu_runner(task, context.gpu_count)
            if unrunnable is not None:
                record([unrunnable], 1)
            else:
                run([task], task.gpus)
    return [results[task.id] for task in context.assignment.tasks]
