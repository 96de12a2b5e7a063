"""The trusted checker: the pytest plugin the hidden tests run under (`pytest -p common.grading.checker`).

It runs in a process that never imports the submission (an import hook refuses the assignment's package, so
a hidden test that tries fails at once, loudly). It provides the `submission` fixture (`client.Submission`),
one worker per task in one sandbox, and writes each test's verdict to the report file the harness named, one
JSON line per event. The submission never runs in this process, so it cannot reach the report, the tests or
pytest: a verdict is what the test decided.

What a student sees of a failure is the checker's own message: the assertion's message (pytest's assertion
rewriting is off, so no test source is quoted), or a `SubmissionFault`'s, which carries at most a capped
excerpt of the worker's exception. Infrastructure faults are only those this process observes itself
(`faults.InfrastructureFault`, or a port it opened that was taken); the submission cannot raise one here.
"""

from __future__ import annotations

import errno
import importlib.abc
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from common.grading.client import Sandboxes, Submission, TaskRunner
from common.grading.faults import (
    GpuBusyError,
    InfrastructureFault,
    SubmissionFault,
    SubmissionRaised,
    gpu_held_by_others,
    grading_run_pids,
)
from common.grading.manifest import Task
from common.grading.sandbox import SandboxSpec
from common.grading.session import Session, WorkerLimits
from common.grading.suites import IsolatedSettings

MESSAGE_CHARS = 600  # of a failure message in results.json: enough to debug, too little to dump a file


@dataclass
class CheckerConfig:
    """What the harness tells one checker process (written as JSON, passed with --grading-config)."""

    report: str  # the JSON-lines file verdicts go to
    package: str  # the submission's package: this process must never import it
    scenarios: str  # the assignment's tests/hidden/scenarios folder
    tasks: list[Task] = field(default_factory=list)
    src: str = ""  # the submission's src/ folder ("" when only collecting)
    scratch: str = ""  # host folder for the unsandboxed mode
    gpus: list[int] = field(default_factory=list)
    threads: int = 1
    sandboxed: bool = True
    max_processes: int = 64
    preload: list[str] = field(default_factory=list)  # the assignment's worker_preload
    cache: str = ""  # the batch's cache of isolated runs (`suites`); "" for none

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self)))
        return path

    @classmethod
    def read(cls, path: Path) -> CheckerConfig:
        raw = json.loads(Path(path).read_text())
        tasks = [Task(**{**task, "tests": tuple(task["tests"])}) for task in raw.pop("tasks")]
        return cls(**raw, tasks=tasks)


class SubmissionImportGuard(importlib.abc.MetaPathFinder):
    """Refuses to import the submission's package into the trusted process."""

    def __init__(self, package: str) -> None:
        self.package = package

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == self.package or name.startswith(self.package + "."):
            raise ImportError(
                f"the hidden tests must not import the submission ({name}); "
                "call it through the `submission` fixture (see common/grading/client.py)"
            )


def explain(error: BaseException) -> tuple[str, str | None]:
    """(what the student sees, the infrastructure fault or None) for an exception that failed a test."""
    leaves = _leaves(error)
    for leaf in leaves:
        if isinstance(leaf, InfrastructureFault):
            return str(leaf), str(leaf)
        if isinstance(leaf, OSError) and leaf.errno == errno.EADDRINUSE:  # raised here, by trusted code
            return f"a port the checker opened was taken: {leaf}", f"port in use: {leaf}"
    leaf = leaves[0]
    if isinstance(leaf, SubmissionFault | AssertionError):
        return (str(leaf) or "assertion failed")[:MESSAGE_CHARS], None
    return f"{type(leaf).__name__}: {leaf}"[:MESSAGE_CHARS], None


def _leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside a group (hypothesis reports several distinct failures as one), or the error."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


class Checker:
    """Verdicts of the hidden tests on one submission, written as they happen."""

    def __init__(self, config: CheckerConfig) -> None:
        self.config = config
        self._report = open(config.report, "a")  # closed at the end of the session
        spec = SandboxSpec(
            src=Path(config.src),
            scratch=Path(config.scratch),
            gpus=tuple(config.gpus),
            threads=config.threads,
            sandboxed=config.sandboxed,
            preload=tuple(config.preload),
        )
        self.sandboxes = Sandboxes(lambda: Session(spec, config.max_processes), spec.tmp)
        self.runners = {
            task.id: TaskRunner(
                task.id,
                task.time_limit_s,
                WorkerLimits(
                    address_space_bytes=None if task.gpus else task.memory_mb * 2**20,
                    gpu_memory_bytes=task.memory_mb * 2**20 if task.gpus else 0,
                ),
                self.sandboxes,
                Path(config.scenarios),
                isolated=IsolatedSettings(
                    workdir=Path(config.scratch) / "isolated",
                    sandboxed=config.sandboxed,
                    threads=config.threads,
                    max_processes=config.max_processes,
                    address_space_bytes=(8192 if task.gpus else task.memory_mb) * 2**20,
                    cache=Path(config.cache) if config.cache else None,
                ),
            )
            for task in config.tasks
        }
        self._failures: dict[str, tuple[str, str | None]] = {}
        self._passed: set[str] = set()
        self._outputs: list[str] = []

    def write(self, record: dict[str, Any]) -> None:
        self._report.write(json.dumps(record) + "\n")
        self._report.flush()

    def task_of(self, nodeid: str) -> Task:
        for task in self.config.tasks:
            if task.selects(nodeid):
                return task
        raise pytest.UsageError(f"{nodeid} belongs to no task this checker grades")

    @pytest.fixture
    def submission(self, request: pytest.FixtureRequest) -> Submission:
        """The submission under test: calls into its sandboxed worker (see common.grading.client)."""
        task = self.task_of(request.node.nodeid)
        runner = self.runners[task.id]
        if task.gpus and runner.calls == 0:
            busy = gpu_held_by_others(tuple(self.config.gpus), grading_run_pids())
            if busy:
                raise GpuBusyError(busy)
        return Submission(runner, Path(self.config.src))

    # ------------------------------------------------------------------------------------------ pytest hooks
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.write({"kind": "collected", "nodeids": [item.nodeid for item in session.items]})

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.write(
                {"kind": "collect_error", "path": report.nodeid, "message": str(report.longrepr)[-2000:]}
            )

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo) -> Any:
        outcome = yield
        report = outcome.get_result()
        if report.passed and call.when == "call":
            self._passed.add(item.nodeid)
        elif report.skipped and item.nodeid not in self._failures:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self._failures[item.nodeid] = (f"skipped, which a hidden test must not be: {reason}", None)
        elif report.failed and item.nodeid not in self._failures:
            error = call.excinfo.value if call.excinfo else None
            message, infra = (
                explain(error) if error is not None else (str(report.longrepr)[:MESSAGE_CHARS], None)
            )
            if infra is None and self._gpu_taken(item.nodeid, error):
                message = infra = self._gpu_taken(item.nodeid, error)
            where = "" if call.when == "call" else f" (in test {call.when})"
            self._failures[item.nodeid] = (message + where, infra)

    def _gpu_taken(self, nodeid: str, error: BaseException | None) -> str | None:
        """After a CUDA out-of-memory error in a GPU task: whether another process held the GPU."""
        task = self.task_of(nodeid)
        if not task.gpus or not isinstance(error, SubmissionRaised) or error.name != "OutOfMemoryError":
            return None
        session = self.sandboxes.session
        return gpu_held_by_others(
            tuple(self.config.gpus), {*grading_run_pids(), *(session.pids() if session else ())}
        )

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        message, infra = self._failures.get(nodeid, ("", None))
        passed = nodeid in self._passed and nodeid not in self._failures
        self.write({"kind": "result", "nodeid": nodeid, "passed": passed, "message": message, "infra": infra})

    def pytest_sessionfinish(self) -> None:
        for runner in self.runners.values():
            if runner.calls or runner.stopped:
                self.write({"kind": "task", "id": runner.task_id, "timed_out": runner.timed_out,
                            "process_limit_hit": runner.process_limit_hit, "worker_s": round(runner.used_s, 3)})  # fmt: skip
        self.sandboxes.close()
        self.write({"kind": "output", "text": self.sandboxes.output()})
        self._report.close()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--grading-config", help="the JSON file the grading harness wrote for this checker")


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--grading-config")
    if not path:
        raise pytest.UsageError("common.grading.checker runs under the grading harness (effdl grade)")
    checker_config = CheckerConfig.read(Path(path))
    sys.meta_path.insert(0, SubmissionImportGuard(checker_config.package))
    for marker in ("gpu: needs a CUDA GPU", "slow: takes more than a few seconds"):
        config.addinivalue_line("markers", marker)
    config.pluginmanager.register(Checker(checker_config), "effdl-checker")
