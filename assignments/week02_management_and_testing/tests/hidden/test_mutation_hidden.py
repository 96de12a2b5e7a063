"""Task mutation: your tests catch each bug of the starter, planted back one at a time.

For each bug, your test suite runs on the reference implementation (where it must pass: a suite that fails
on correct code catches nothing) and on the reference with that one bug's starter code put back (where it
must fail: pytest's exit status 1, some test failed), each twice and each time in a fresh sandbox: an outcome
counts only if it holds (`planted.REPEATS`). The runs are started here, their exit statuses are read here,
and the programs they run are built here (`planted.reference_tree`); nothing your tests print or write decides
the verdict. The reference runs are the same for every bug, so the batch's cache runs them once.
"""

from __future__ import annotations

import planted
import pytest

from common.grading.client import Submission


# Numbered, not named: the feedback students get must not hand them the list of bugs.
@pytest.mark.parametrize("bug", planted.BUGS, ids=[f"bug{i}" for i in range(1, len(planted.BUGS) + 1)])
def test_your_tests_catch_the_bug(submission: Submission, bug: str) -> None:
    planted.check_suite_source(submission)
    correct = planted.run_suite(submission, planted.with_students_tests(planted.reference_tree(), submission))
    assert correct.outcome == "passed", (
        f"your tests must pass on a correct implementation (ours), but they {correct.outcome}: "
        f"{planted.tail(correct.run)}"
    )
    bugged_tree = planted.with_students_tests(planted.reference_tree((bug,)), submission)
    bugged = planted.run_suite(submission, bugged_tree, coverage=False, must="failed")
    assert bugged.outcome == "failed", (
        f"your tests do not catch one of the starter's bugs: on a program with only that bug they {bugged.outcome}"
    )
