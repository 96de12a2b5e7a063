"""Grading many submissions: parallel jobs, GPUs handed out to the tasks that need them, progress."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from common.grading.harness import GradingContext, TaskResult, grade_submission, needs_gpu_runner
from common.grading.intake import Submission
from common.grading.manifest import Task


@dataclass
class SubmissionResult:
    """Every task's grade for one submission."""

    submission: Submission
    tasks: list[TaskResult] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def name(self) -> str:
        return self.submission.name

    @property
    def score(self) -> float:
        return round(sum(t.score for t in self.tasks if t.score is not None), 4)

    @property
    def max_score(self) -> float:
        """Points of the tasks graded here (a task that needs a GPU runner is graded there)."""
        return sum(t.task.points for t in self.tasks if t.score is not None)

    @property
    def complete(self) -> bool:
        return all(t.status == "graded" for t in self.tasks)


class GpuPool:
    """Hands out physical GPU indices; a task that needs k GPUs waits until k are free."""

    def __init__(self, gpus: Sequence[int]) -> None:
        self._free = list(gpus)
        self._cond = threading.Condition()

    def acquire(self, n: int) -> list[int]:
        if n == 0:
            return []
        with self._cond:
            self._cond.wait_for(lambda: len(self._free) >= n)
            taken, self._free = self._free[:n], self._free[n:]
            return taken

    def release(self, gpus: list[int]) -> None:
        with self._cond:
            self._free.extend(gpus)
            self._cond.notify_all()


def _refused(submission: Submission, tasks: Sequence[Task], gpu_count: int) -> list[TaskResult]:
    """A refused submission scores 0 on every task this machine can grade; the rest show what others show."""
    return [
        needs_gpu_runner(task, gpu_count) or TaskResult(task, "graded", 0.0, detail=submission.refused or "")
        for task in tasks
    ]


def grade_batch(
    context: GradingContext,
    submissions: Sequence[Submission],
    jobs: int = 1,
    gpus: Sequence[int] | None = None,
    on_task_done: Callable[[str, TaskResult], None] | None = None,
) -> list[SubmissionResult]:
    """Grade every submission, `jobs` at a time; results in the order of `submissions`."""
    gpus = list(range(context.gpu_count)) if gpus is None else list(gpus)
    context.gpu_count = len(gpus)
    pool = GpuPool(gpus)
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))

    def grade_one(submission: Submission) -> SubmissionResult:
        start = time.monotonic()
        result = SubmissionResult(submission)
        if submission.refused:
            result.tasks = _refused(submission, context.assignment.tasks, context.gpu_count)
            for task_result in result.tasks:
                if on_task_done:
                    on_task_done(submission.name, task_result)
            return result
        result.tasks = grade_submission(
            context,
            submission.files,
            pool.acquire,
            pool.release,
            threads,
            lambda task_result: on_task_done and on_task_done(submission.name, task_result),
        )
        result.duration_s = time.monotonic() - start
        return result

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as executor:
        return list(executor.map(grade_one, submissions))


def unique_names(paths: Sequence[Path]) -> list[str]:
    """Submission names from their paths (zip stem or folder name), made unique with a suffix."""
    names: list[str] = []
    for path in paths:
        base = Path(path).stem if Path(path).suffix == ".zip" else Path(path).name
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names
