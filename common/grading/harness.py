"""Grading one submission: a fresh work tree per task, the hidden tests in the sandbox, a score per task.

`GradingContext.prepare` does the per-assignment work once per batch: it builds the starter tree (solution
blocks stubbed, mutants left out) that every work tree is copied from, and asks pytest, on the reference
solution, which hidden tests each task has. Those expected test ids are the ground truth: a test a submission
prevents from running (by crashing, exiting, hanging or deselecting it) is a failed test, not a missing one.
"""

from __future__ import annotations

import secrets
import shutil
import site
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import EffdlError
from common.grading.manifest import Assignment, Task
from common.grading.sandbox import GPU_MEMORY_ENV, JailSpec, Limits, RunResult, run_in_sandbox
from common.grading.solutions import Transform, reference_source, starter_source
from common.weeks import REPO_ROOT

_SYSTEM_READ_PATHS = (
    "/usr",
    "/lib",
    "/lib64",
    "/lib32",
    "/bin",
    "/sbin",
    "/etc",
    "/proc",
    "/sys",
    "/opt",
    "/run",
)
_PYTEST_INI = """\
[pytest]
markers =
    gpu: needs a CUDA GPU
    slow: takes more than a few seconds
"""
MESSAGE_CHARS = 600  # of a failure message in results.json: enough to debug, too little to dump a file
MIN_REDACTED_LINE = 12  # shorter lines of a hidden test (`return x`, `)`) are too common to count as a leak


class GraderSetupError(EffdlError):
    """The grader itself cannot run: hidden tests that do not collect on the reference, a missing tool."""


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
    duration_s: float = 0.0
    attempts: int = 1
    log: str = ""
    isolation: dict[str, str] = field(default_factory=dict)  # what the sandbox could enforce on this machine


@dataclass
class GradingContext:
    """Per-assignment state shared by every submission of a batch."""

    assignment: Assignment
    workdir: Path
    starter: Path
    lib: Path  # holds only a link to the course library, so `import common` works but `assignments/` stays unreadable
    expected: dict[str, list[str]]  # task id -> hidden test ids
    hidden_lines: frozenset[str]
    gpu_count: int

    @classmethod
    def prepare(
        cls, assignment: Assignment, workdir: Path | None = None, gpu_count: int | None = None
    ) -> GradingContext:
        workdir = Path(workdir or tempfile.mkdtemp(prefix="effdl-grade-"))
        (workdir / "runs").mkdir(parents=True, exist_ok=True)
        lib = workdir / "lib"
        lib.mkdir(exist_ok=True)
        if not (lib / "common").exists():
            (lib / "common").symlink_to(REPO_ROOT / "common", target_is_directory=True)
        starter = build_tree(assignment, workdir / "starter", starter_source)
        hidden = assignment.root / "tests" / "hidden"
        lines = {
            line.strip()
            for path in hidden.rglob("*.py")
            for line in path.read_text().splitlines()
            if len(line.strip()) >= MIN_REDACTED_LINE
        }
        if gpu_count is None:
            import torch

            gpu_count = torch.cuda.device_count()
        context = cls(assignment, workdir, starter, lib, {}, frozenset(lines), gpu_count)
        context.expected = context._collect_expected()
        return context

    def _collect_expected(self) -> dict[str, list[str]]:
        collected = self.collect([sel for task in self.assignment.tasks for sel in task.tests])
        expected = {task.id: [n for n in collected if task.selects(n)] for task in self.assignment.tasks}
        empty = [task_id for task_id, ids in expected.items() if not ids]
        if empty:
            raise GraderSetupError(f"{self.assignment.name}: tasks {empty} select no hidden tests")
        return expected

    def collect(self, selections: list[str]) -> list[str]:
        """The test ids pytest collects for `selections` on the reference solution."""
        reference = self.workdir / "reference"
        if not reference.exists():  # built once per batch, however many selections are collected
            build_tree(self.assignment, reference, reference_source)
        run = self.run_pytest(reference, ["--collect-only", *selections], Limits(time_limit_s=300))
        collected = next((m["nodeids"] for m in run.messages if m["kind"] == "collected"), None)
        errors = [m["message"] for m in run.messages if m["kind"] == "collect_error"]
        if collected is None or errors:
            detail = errors[0] if errors else (run.supervisor_error or run.output_tail[-2000:])
            raise GraderSetupError(
                f"{self.assignment.name}: {' '.join(selections)} do not collect on the reference solution:\n{detail}"
            )
        return collected

    def run_pytest(
        self,
        tree: Path,
        args: list[str],
        limits: Limits,
        gpus: list[int] = (),
        gpu_memory: int = 0,
        threads: int = 1,
    ) -> RunResult:
        """pytest with the grader plugin in `tree`, sandboxed; `gpus` are the physical GPUs it may see."""
        home, tmp = tree / ".home", tree / ".tmp"
        home.mkdir(exist_ok=True)
        tmp.mkdir(exist_ok=True)
        (tree / "pytest.ini").write_text(_PYTEST_INI)
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "HOME": str(home),
            "TMPDIR": str(tmp),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "MPLCONFIGDIR": str(home / ".matplotlib"),
            "TRITON_CACHE_DIR": str(home / ".triton"),
            "TORCHINDUCTOR_CACHE_DIR": str(home / ".inductor"),
            "MPLBACKEND": "Agg",
            "LANG": "C.UTF-8",
            "PYTHONPATH": f"{tree / 'src'}:{self.lib}",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0",
            "PYTHONUNBUFFERED": "1",
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
            "OMP_NUM_THREADS": str(threads),  # parallel jobs share the cores instead of fighting over them
            "MKL_NUM_THREADS": str(threads),
            "OPENBLAS_NUM_THREADS": str(threads),
            "MALLOC_ARENA_MAX": "2",  # glibc reserves 64 MB of address space per arena; keep RLIMIT_AS meaningful
            "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus),
        }
        if gpu_memory:
            env[GPU_MEMORY_ENV] = str(gpu_memory)
        argv = [sys.executable, "-m", "pytest", "-p", "common.grading.plugin", "-p", "no:cacheprovider",
                "-c", "pytest.ini", "--rootdir", str(tree), "-q", "--no-header", "-rN", *args]  # fmt: skip
        python_trees = {sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages()}
        spec = JailSpec(
            argv=argv,
            cwd=str(tree),
            env=env,
            limits=limits,
            read_paths=[*_SYSTEM_READ_PATHS, *sorted(python_trees), str(self.lib), str(REPO_ROOT / "common")],
            write_paths=[str(tree)],
            token=secrets.token_hex(16),
        )
        return run_in_sandbox(spec)

    def redact(self, text: str) -> str:
        """Remove any line that quotes the hidden tests' source (results are shown to students)."""
        kept = []
        for line in text.splitlines():
            quoted = any(hidden in line for hidden in self.hidden_lines)
            kept.append("[a line quoting the hidden tests was removed]" if quoted else line)
        return "\n".join(kept)


def build_tree(assignment: Assignment, dest: Path, transform: Transform) -> Path:
    """A copy of the assignment without mutants, its `src/` files passed through `transform(text, where)`."""
    if dest.exists():
        shutil.rmtree(dest)
    ignore = shutil.ignore_patterns("mutants", "__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")
    shutil.copytree(assignment.root, dest, ignore=ignore)
    for path in (dest / "src").rglob("*.py"):
        path.write_text(transform(path.read_text(), str(path.relative_to(dest))))
    return dest


def needs_gpu_runner(task: Task, gpu_count: int) -> TaskResult | None:
    """The "needs GPU runner" result of a task this machine has too few GPUs for; None if it has enough."""
    if task.gpus <= gpu_count:
        return None
    have = f"this machine has {gpu_count}" if gpu_count else "this machine has none"
    return TaskResult(task, "needs GPU runner", None, detail=f"needs {task.gpus} GPU(s); {have}")


def grade_task(
    context: GradingContext, files: dict[str, bytes], task: Task, gpus: list[int], threads: int
) -> TaskResult:
    """Run one task's hidden tests on the submitted files and score them; retried once on a machine fault."""
    unrunnable = needs_gpu_runner(task, context.gpu_count)
    if unrunnable is not None:
        return unrunnable
    result = None
    for attempt in (1, 2):
        result = _run_task_once(context, files, task, gpus, threads)
        result.attempts = attempt
        if result.status != "infrastructure error":
            break
    return result


def _run_task_once(
    context: GradingContext, files: dict[str, bytes], task: Task, gpus: list[int], threads: int
) -> TaskResult:
    tree = Path(tempfile.mkdtemp(prefix=f"{task.id}-", dir=context.workdir / "runs"))
    try:
        shutil.copytree(context.starter, tree, dirs_exist_ok=True)
        for relative, data in files.items():
            (tree / "src" / relative).write_bytes(data)
        limits = Limits(
            time_limit_s=task.time_limit_s,
            address_space_bytes=None if task.gpus else task.memory_mb * 2**20,
        )
        gpu_memory = task.memory_mb * 2**20 if task.gpus else 0
        run = context.run_pytest(
            tree, list(task.tests), limits, gpus=gpus, gpu_memory=gpu_memory, threads=threads
        )
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    return score_run(context, task, run)


def score_run(context: GradingContext, task: Task, run: RunResult) -> TaskResult:
    """Turn the sandbox's report into per-test outcomes and a score."""
    log = f"[isolation: {run.isolation}]\n{run.output_tail}"
    if run.supervisor_error:
        return TaskResult(
            task, "infrastructure error", None, detail=run.supervisor_error, log=log, isolation=run.isolation
        )
    reported = {m["nodeid"]: m for m in run.messages if m["kind"] == "result"}
    started = [m["nodeid"] for m in run.messages if m["kind"] == "start"]
    collect_errors = [m["message"] for m in run.messages if m["kind"] == "collect_error"]
    finished = next((m for m in run.messages if m["kind"] == "finished"), None)
    unfinished = next((n for n in reversed(started) if n not in reported), None)
    if run.timed_out:
        why = f"not run: the task's time limit of {task.time_limit_s:.0f} s ran out" + (
            f" during {unfinished.split('::')[-1]}" if unfinished else ""
        )
    elif run.process_limit_hit:
        why = "not run: the submission was stopped for starting too many processes"
    elif collect_errors:
        why = (
            "not run: the tests could not import the submission: "
            + collect_errors[0].strip().splitlines()[-1]
        )
    elif finished is None:
        why = f"not run: the test process ended early (exit code {run.returncode})"
    else:
        why = f"not run: pytest stopped before this test (exit status {finished.get('exitstatus')})"
    why = context.redact(why)[:MESSAGE_CHARS]
    outcomes, infra = [], []
    for nodeid in context.expected[task.id]:
        message = reported.get(nodeid)
        if message is None:
            outcomes.append(CaseOutcome(nodeid, False, why))
            continue
        if message.get("infra"):
            infra.append(f"{nodeid}: {message['infra']}")
        text = context.redact(str(message.get("message", "")))[:MESSAGE_CHARS]
        outcomes.append(CaseOutcome(nodeid, bool(message.get("passed")), text))
    if infra:
        return TaskResult(
            task,
            "infrastructure error",
            None,
            outcomes,
            detail=context.redact("; ".join(infra[:3])),
            duration_s=run.duration_s,
            log=log,
            isolation=run.isolation,
        )
    passed, total = sum(o.passed for o in outcomes), len(outcomes)
    if task.partial_credit == "all_or_nothing":
        score = task.points if passed == total else 0.0
    else:
        score = round(task.points * passed / total, 4)
    detail = f"{passed}/{total} tests passed"
    if run.timed_out:
        detail += f"; time limit {task.time_limit_s:.0f} s exceeded"
    if run.forged_messages:
        detail += f"; {run.forged_messages} forged result line(s) ignored"
    return TaskResult(
        task,
        "graded",
        score,
        outcomes,
        detail=detail,
        duration_s=run.duration_s,
        log=log,
        isolation=run.isolation,
    )
