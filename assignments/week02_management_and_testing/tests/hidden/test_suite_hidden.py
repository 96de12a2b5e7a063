"""Task test_suite: your tests pass on your own code and cover at least 80% of the training module's lines.

Your tests run as plain pytest in fresh sandboxes (`planted.run_suite`, twice); the exit status pytest returns
there, the same both times, is the verdict. Coverage is measured on the reference's training module, in the run the mutation task makes
anyway: only your test files (which `check_suite_source` scans) run beside it there, so code of your
`train.py` cannot write the coverage report.
"""

from __future__ import annotations

import planted

from common.grading.client import Submission


def test_your_tests_pass_on_your_code(submission: Submission) -> None:
    planted.check_suite_source(submission)
    result = planted.run_suite(submission, submission.tree())
    assert result.outcome == "passed", (
        f"your tests on your code: {result.outcome}; {planted.tail(result.run)}"
    )


def test_your_tests_cover_the_training_module(submission: Submission) -> None:
    planted.check_suite_source(submission)
    # The mutation task's run on the reference: the batch's cache answers it.
    result = planted.run_suite(submission, planted.with_students_tests(planted.reference_tree(), submission))
    assert result.outcome == "passed", (
        f"coverage counts only for a suite that passes on the reference; it {result.outcome}"
    )
    percent = planted.coverage_percent(result.run)
    assert percent is not None, "the run left no coverage report"
    assert percent >= planted.MIN_COVERAGE, (
        f"your tests cover {percent:.1f}% of the lines of {planted.TRAINING_MODULE}; at least "
        f"{planted.MIN_COVERAGE:g}% is required"
    )
