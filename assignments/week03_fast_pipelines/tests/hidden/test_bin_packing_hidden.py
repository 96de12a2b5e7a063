"""Hidden tests of `first_fit_decreasing` (task bin_packing).

References built here: a direct, quadratic first-fit decreasing written from the docstring (the result must
match it exactly: the order and tie-breaking are specified), the lower bound ceil(sum / capacity), and the
true optimum by exhaustive search on tiny inputs, for FFD's guarantee bins <= 11/9 OPT + 6/9. The
submission's function runs in its worker; only its result, a list of lists of ints, comes back.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.grading.client import Submission, raises

# Derandomised: every run draws the same examples. No deadline and no "too slow" health check: graders
# run two jobs at once on two cores, so the time an example takes says nothing about the code. The
# `submission` fixture is a handle on the worker, the same for every example.
SETTINGS = settings(
    database=None,
    deadline=None,
    max_examples=80,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
FFD = "fastpipe.batching:first_fit_decreasing"


def first_fit_decreasing(submission: Submission, sizes: list[int], capacity: int) -> list[list[int]]:
    return submission.call(FFD, sizes, capacity, returns=list[list[int]])


def reference_ffd(sizes: list[int], capacity: int) -> list[list[int]]:
    bins: list[list[int]] = []
    loads: list[int] = []
    for item in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        for b, load in enumerate(loads):
            if load + sizes[item] <= capacity:
                bins[b].append(item)
                loads[b] += sizes[item]
                break
        else:
            bins.append([item])
            loads.append(sizes[item])
    return bins


def optimum(sizes: list[int], capacity: int) -> int:
    """The fewest bins, by depth-first search (biggest items first; an item opens at most one new bin)."""
    items = sorted(sizes, reverse=True)
    best = len(items)

    def place(i: int, loads: list[int]) -> None:
        nonlocal best
        if len(loads) >= best:
            return
        if i == len(items):
            best = len(loads)
            return
        for b in range(len(loads)):
            if loads[b] + items[i] <= capacity:
                loads[b] += items[i]
                place(i + 1, loads)
                loads[b] -= items[i]
        place(i + 1, [*loads, items[i]])

    place(0, [])
    return best


def check_invariants(bins: list[list[int]], sizes: list[int], capacity: int) -> None:
    assert sorted(i for b in bins for i in b) == list(range(len(sizes))), (
        "every item must be in exactly one bin"
    )
    for b in bins:
        assert b, "no bin may be empty"
        assert sum(sizes[i] for i in b) <= capacity, (
            f"a bin holds {sum(sizes[i] for i in b)} > capacity {capacity}"
        )
    assert len(bins) >= math.ceil(sum(sizes) / capacity), "fewer bins than the lower bound: impossible"


def assert_is_ffd(bins: list[list[int]], sizes: list[int], capacity: int) -> None:
    check_invariants(bins, sizes, capacity)
    assert bins == reference_ffd(sizes, capacity), (
        f"the bins differ from first-fit decreasing's on {len(sizes)} items of capacity {capacity}"
    )


@st.composite
def instances(draw, max_items: int = 60) -> tuple[list[int], int]:
    capacity = draw(st.integers(1, 100))
    distribution = draw(st.sampled_from(["any", "small", "large", "halves"]))
    low, high = {
        "any": (0, capacity),
        "small": (0, max(1, capacity // 5)),
        "large": (capacity // 2, capacity),
        "halves": (capacity // 3, capacity // 2 + 1),
    }[distribution]
    sizes = draw(st.lists(st.integers(low, min(high, capacity)), max_size=max_items))
    return sizes, capacity


@SETTINGS
@given(instances())
def test_matches_first_fit_decreasing_exactly(
    submission: Submission, instance: tuple[list[int], int]
) -> None:
    sizes, capacity = instance
    assert_is_ffd(first_fit_decreasing(submission, sizes, capacity), sizes, capacity)


@SETTINGS
@given(instances(max_items=7))
def test_within_the_ffd_bound_of_the_optimum(submission: Submission, instance: tuple[list[int], int]) -> None:
    sizes, capacity = instance
    bins = first_fit_decreasing(submission, sizes, capacity)
    check_invariants(bins, sizes, capacity)
    assert len(bins) <= 11 / 9 * optimum(sizes, capacity) + 6 / 9, "more bins than FFD's guarantee allows"


def test_a_larger_random_input(submission: Submission) -> None:
    generator = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 2049, (1500,), generator=generator).tolist()
    assert_is_ffd(first_fit_decreasing(submission, sizes, 2048), sizes, 2048)


@pytest.mark.parametrize(
    ("sizes", "capacity"),
    [([], 10), ([7], 10), ([10], 10), ([0, 0, 0], 1), ([5, 5, 5, 5], 10), ([3, 0, 7], 7)],
)
def test_edge_cases(submission: Submission, sizes: list[int], capacity: int) -> None:
    assert_is_ffd(first_fit_decreasing(submission, sizes, capacity), sizes, capacity)


def test_item_larger_than_capacity_raises_a_clear_error(submission: Submission) -> None:
    with raises("ValueError") as raised:
        submission.call(FFD, [3, 12, 5], 10)
    message = raised[0].line
    assert "12" in message and "10" in message, f"the message should name the size and capacity: {message!r}"


@pytest.mark.parametrize(("sizes", "capacity"), [([1, 2], 0), ([1, -2], 5)])
def test_bad_arguments_raise_value_error(submission: Submission, sizes: list[int], capacity: int) -> None:
    with raises("ValueError"):
        submission.call(FFD, sizes, capacity)
