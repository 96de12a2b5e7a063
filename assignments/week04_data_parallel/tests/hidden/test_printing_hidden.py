"""Hidden tests of `print_in_rank_order` (task ordered_printing): the exact output, on 1 to 4 ranks.

The ranks run through the grader's hub (`common.grading.ranks`), which starts them highest rank first, each
running until its first collective, and lets them exit highest first. A line printed before the ranks below it
have printed, or left in a buffer until exit, therefore comes out of order every time, not by bad luck.
"""

from __future__ import annotations

import pytest
from scenarios import printing

from common.grading.client import Submission
from common.grading.ranks import RankRun


def expected(texts_per_call: list[list[str]]) -> str:
    world_size = len(texts_per_call[0])
    return "".join(
        f"rank {r} of {world_size}: {text}\n" for texts in texts_per_call for r, text in enumerate(texts)
    )


def assert_printed(submission: Submission, texts_per_call: list[list[str]]) -> None:
    run = RankRun.from_data(submission.run(printing.print_calls, texts_per_call))
    run.returned(None)
    want = expected(texts_per_call)
    assert run.stdout == want, f"the ranks printed {run.stdout[:300]!r}, expected {want[:300]!r}"


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_one_call(submission: Submission, world_size: int) -> None:
    assert_printed(submission, [[f"hello from {r}" for r in range(world_size)]])


@pytest.mark.parametrize("world_size", [2, 4])
def test_calls_in_a_row_do_not_interleave(submission: Submission, world_size: int) -> None:
    texts = [[f"call {call} {'.' * (r + 1)}" for r in range(world_size)] for call in range(3)]
    assert_printed(submission, texts)


def test_texts_are_printed_as_given(submission: Submission) -> None:
    assert_printed(submission, [["", "  spaced  ", "ünïcödé ✓"]])
