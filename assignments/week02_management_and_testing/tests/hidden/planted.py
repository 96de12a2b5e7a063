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

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from common.grading.client import Submission
from common.grading.solutions import inject_bugs, planted_bugs, transformed_tree
from common.grading.source_scan import scan_source
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
# Every run of a suite is repeated (each in a fresh sandbox), and its outcome counts only if it holds: a suite
# that passes or fails at random would otherwise catch a planted bug a quarter of the time (pass on the
# reference, then fail on the bug); with two runs of each, one time in sixteen.
REPEATS = 2

PYTEST = [sys.executable, "-P", "-m", "pytest", "{src}/ddpm2d/tests", "-q", "-p", "no:cacheprovider",
          "-o", "addopts=", "--rootdir={src}"]  # fmt: skip
# The runs on correct code measure coverage too; a run on a bugged program stops at its first failure.
COVERAGE = ["-p", "pytest_cov", f"--cov={TRAINING_MODULE}", "--cov-report=json:{outbox}/coverage.json"]
PYTEST_ENV = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}

# What a test suite needs only to read the code under test, or to decide its own exit status or coverage:
# names and text that a behavioural test has no use for. A determined suite can hide them (getattr with a
# built string); this is the first line, the TA reading the suite is the second.
SUSPICIOUS_NAMES = frozenset({  # as a name, an attribute (`sys.exit`, `pytest.exit`) or an import
    "inspect", "dis", "linecache", "importlib", "pkgutil", "getsource", "getsourcelines", "__code__", "co_code",
    "co_names", "co_consts", "__file__", "__path__", "__spec__", "__loader__", "get_data", "_exit", "exit",
    "SystemExit", "settrace", "setprofile", "coverage", "__import__",
})  # fmt: skip
# Built-ins that run code given as text: suspicious as bare names only (`model.eval()`, `torch.compile` are fine).
SUSPICIOUS_BUILTINS = frozenset({"exec", "eval", "compile", "quit"})
SUSPICIOUS_TEXT = ("outbox", "coverage", ".py")  # in a string that is not a docstring


def reference_tree(bugs: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file of the reference's src/ (markers dropped), with the starter text of `bugs` put back."""
    return transformed_tree(SRC, lambda text, where: inject_bugs(text, where, bugs))


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
        scanned = scan_source(source)
    except SyntaxError as error:
        return [f"a syntax error at line {error.lineno}"]
    anywhere = SUSPICIOUS_NAMES | SUSPICIOUS_BUILTINS
    found = ((scanned.names | scanned.imported_names) & anywhere) | (scanned.attributes & SUSPICIOUS_NAMES)
    found |= {name for name in scanned.imports if set(name.split(".")) & anywhere}
    found |= {repr(text) for text in SUSPICIOUS_TEXT if any(text in string for string in scanned.strings)}
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


@dataclass(frozen=True)
class SuiteResult:
    """What REPEATS runs of a suite on one program say, and the run it is read from."""

    outcome: str  # "passed", "failed", or why the runs say nothing about the program
    run: IsolatedRun  # for the feedback's tail and the coverage report


def run_suite(
    submission: Submission, tree: dict[str, bytes], coverage: bool = True, must: str = "passed"
) -> SuiteResult:
    """The student's suite (it is in `tree`) on the program in `tree`, in fresh sandboxes: REPEATS runs whose
    outcome must be `must` every time, stopping at the first that is not (the verdict is decided then)."""
    argv = [*PYTEST, *COVERAGE] if coverage else [*PYTEST, "-x"]
    for repeat in range(REPEATS):
        run = submission.run_isolated(tree, argv, time_limit_s=SUITE_LIMIT_S, env=PYTEST_ENV, repeat=repeat)
        if outcome(run) != must:
            said = (
                outcome(run)
                if repeat == 0
                else (
                    f"{must} once and {outcome(run)} once on the same program (an outcome that changes from run "
                    "to run says nothing about the program)"
                )
            )
            return SuiteResult(said, run)
    return SuiteResult(must, run)


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
