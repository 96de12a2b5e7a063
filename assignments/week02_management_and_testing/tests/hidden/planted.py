"""The trusted side of grading a student's tests: the programs they run against, and how a run is judged.

Not a scenario: this module runs only in the checker. It reads the reference (`src/`, with its solution
blocks) and builds source trees from it with `common.grading.solutions.inject_bugs`; the student's files come
from `submission.tree()`, as bytes, and are never imported here.

Why the planted bugs go into the *reference*, not into the student's fixed code: a bug's starter text
replaces exactly the block it came from, whatever the student wrote there (a fix that reads differently, a
function split in two); every student's tests face the same bugged programs; and a suite that tests
something other than the documented functions (a helper of the student's own) shows it at once, by failing
on the reference. The student's own code is still run: their suite must pass on it (task test_suite).
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

from common.grading.client import Submission
from common.grading.solutions import SOLUTION_SUFFIXES, inject_bugs, planted_bugs
from common.grading.suites import IsolatedRun

ASSIGNMENT = Path(__file__).resolve().parents[2]
SRC = ASSIGNMENT / "src"
TESTS = "ddpm2d/tests/"  # the student's test package, as submitted
TRAINING_MODULE = "ddpm2d.train"
# Every bug of the starter's program, each graded on its own: the student's suite must catch it.
BUGS = ("schedule_coefficient", "noise_distribution", "noise_broadcast", "device_mismatch", "missing_seed",
        "epoch_metric")  # fmt: skip
MIN_COVERAGE = 80.0
SUITE_LIMIT_S = 120.0  # one run of the suite; the task's own limit bounds them all

PYTEST = [sys.executable, "-P", "-m", "pytest", "{src}/ddpm2d/tests", "-q", "-p", "no:cacheprovider",
          "-o", "addopts=", "--rootdir={src}"]  # fmt: skip
# The runs on correct code measure coverage too; a run on a bugged program stops at its first failure.
COVERAGE = ["-p", "pytest_cov", f"--cov={TRAINING_MODULE}", "--cov-report=json:{outbox}/coverage.json"]
PYTEST_ENV = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}

# What a test suite needs only to read the code under test, or to decide its own exit status or coverage:
# names and text that a behavioural test has no use for. A determined suite can hide them (getattr with a
# built string); this is the first line, the TA reading the suite is the second.
SUSPICIOUS_NAMES = frozenset({
    "inspect", "dis", "linecache", "getsource", "getsourcelines", "__code__", "co_code", "co_names", "co_consts",
    "__file__", "__spec__", "__loader__", "get_data", "_exit", "exit", "SystemExit", "settrace", "setprofile",
    "coverage", "exec", "eval", "compile", "__import__",
})  # fmt: skip
SUSPICIOUS_TEXT = ("outbox", "coverage", ".py")


def reference_tree(bugs: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file of the reference's src/ (markers dropped), with the starter text of `bugs` put back."""
    tree = {}
    for path in sorted(p for p in SRC.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        relative = path.relative_to(SRC).as_posix()
        if path.suffix in SOLUTION_SUFFIXES:
            tree[relative] = inject_bugs(path.read_text(), f"src/{relative}", bugs).encode()
        else:
            tree[relative] = path.read_bytes()
    return tree


def known_bugs() -> set[str]:
    """The bugs the reference's training module plants (BUGS must be among them)."""
    path = SRC / "ddpm2d" / "train.py"
    return set(planted_bugs(path.read_text(), "src/ddpm2d/train.py"))


def with_students_tests(tree: dict[str, bytes], submission: Submission) -> dict[str, bytes]:
    """`tree` with its test package replaced by the submission's."""
    theirs = {path: data for path, data in submission.tree().items() if path.startswith(TESTS)}
    return {**{path: data for path, data in tree.items() if not path.startswith(TESTS)}, **theirs}


def suspicious(source: str) -> list[str]:
    """What a test file uses that only reading the code, or forging a verdict, needs (see SUSPICIOUS_NAMES)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as error:
        return [f"a syntax error at line {error.lineno}"]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in SUSPICIOUS_NAMES:
            found.add(node.id)
        elif isinstance(node, ast.Attribute) and node.attr in SUSPICIOUS_NAMES:
            found.add(node.attr)
        elif isinstance(node, ast.alias) and node.name.split(".")[0] in SUSPICIOUS_NAMES:
            found.add(node.name)
        elif isinstance(node, ast.Constant) and type(node.value) is str:
            found.update(repr(text) for text in SUSPICIOUS_TEXT if text in node.value)
    return sorted(found)


def check_suite_source(submission: Submission) -> None:
    """Fail unless every submitted test file checks behaviour only (see `suspicious`)."""
    for path, data in submission.tree().items():
        if path.startswith(TESTS) and path.endswith(".py"):
            found = suspicious(data.decode(errors="replace"))
            assert not found, (
                f"{path} uses {', '.join(found)}: tests here must check what the code does, not read its source "
                "or decide their own exit status or coverage"
            )


def run_suite(submission: Submission, tree: dict[str, bytes], coverage: bool = True) -> IsolatedRun:
    """The student's suite (it is in `tree`) run once, in a fresh sandbox, on the program in `tree`."""
    argv = [*PYTEST, *COVERAGE] if coverage else [*PYTEST, "-x"]
    return submission.run_isolated(tree, argv, time_limit_s=SUITE_LIMIT_S, env=PYTEST_ENV)


def outcome(run: IsolatedRun) -> str:
    """ "passed" (exit 0), "failed" (exit 1: some test failed), or why the run says nothing about the code."""
    if run.stopped:
        return f"stopped at its {run.stopped}"
    return {0: "passed", 1: "failed"}.get(
        run.returncode, f"pytest exit code {run.returncode} (not a test failure)"
    )


def coverage_percent(run: IsolatedRun) -> float | None:
    """Line coverage of the training module from the run's coverage report, or None if there is none.

    The report is written by the process that ran the student's tests, so a hostile suite could forge it;
    `check_suite_source` refuses the obvious ways, and the number only gates the coverage test."""
    try:
        report = json.loads(run.files.get("coverage.json", b"").decode())
        percent = report["totals"]["percent_covered"]
    except (ValueError, KeyError, TypeError):
        return None
    return float(percent) if type(percent) in (int, float) else None


def tail(run: IsolatedRun, lines: int = 6) -> str:
    """The end of pytest's summary, for the student's feedback."""
    kept = [
        line for line in run.output.splitlines() if line.startswith(("FAILED", "ERROR")) or " in " in line
    ]
    return " | ".join(kept[-lines:])[:400]


if not set(BUGS) <= known_bugs():  # an instructor's mistake: the grader stops at collection, saying which
    raise RuntimeError(
        f"planted.BUGS names bugs the reference does not plant: {sorted(set(BUGS) - known_bugs())}"
    )
