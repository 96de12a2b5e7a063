"""Hidden tests of `LengthBucketBatchSampler` (task length_bucketing).

The invariants are checked on random length distributions (hypothesis, derandomised so every run draws the
same examples); the order of batches is checked against a reference built in the test from the docstring's
definition; the number of batches against the optimum, computed by dynamic programming. The sampler lives in
the submission's worker; its batches come back as lists of ints.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scenarios import bucketing

from common.grading.client import Remote, Submission, raises

# Derandomised: every run draws the same examples. No deadline and no "too slow" health check: graders
# run two jobs at once on two cores, so the time an example takes says nothing about the code. The
# `submission` fixture is a handle on the worker, the same for every example.
SETTINGS = settings(
    database=None,
    deadline=None,
    max_examples=60,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SAMPLER = "fastpipe.batching:LengthBucketBatchSampler"


def sampler(submission: Submission, lengths: list[int], batch_size: int, max_spread: int, **kwargs) -> Remote:
    return submission.new(SAMPLER, lengths, batch_size, max_spread, **kwargs)


def epoch(submission: Submission, bucket_sampler: Remote) -> list[list[int]]:
    """The batches of one epoch: `list(sampler)` in the worker."""
    return submission.call("builtins:list", bucket_sampler, returns=list[list[int]])


def count(bucket_sampler: Remote) -> int:
    return bucket_sampler.call("__len__", returns=int)


LENGTHS = st.one_of(
    st.lists(st.integers(0, 40), max_size=120),  # short sequences, many ties
    st.lists(st.integers(1, 4000), max_size=60),  # wide range, few ties
    st.lists(st.sampled_from([5, 6, 50, 51, 52, 500]), max_size=80),  # clusters
    st.lists(st.integers(0, 3), min_size=0, max_size=2),  # empty and single-item inputs
)


def reference_batches(lengths: list[int], batch_size: int, max_spread: int) -> list[list[int]]:
    """The unshuffled batches, from the docstring: greedy over indices sorted by (length, index)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    for index in order:
        if (
            batches
            and len(batches[-1]) < batch_size
            and lengths[index] - lengths[batches[-1][0]] <= max_spread
        ):
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def fewest_batches(lengths: list[int], batch_size: int, max_spread: int) -> int:
    """The optimum over all splits of the sorted lengths into runs (an optimal split can always be taken as
    runs of the sorted order), by dynamic programming: best[i] = fewest batches for the i shortest."""
    ordered = sorted(lengths)
    best = [0] + [len(ordered) + 1] * len(ordered)
    for i in range(1, len(ordered) + 1):
        for j in range(max(0, i - batch_size), i):
            if ordered[i - 1] - ordered[j] <= max_spread:
                best[i] = min(best[i], best[j] + 1)
    return best[len(ordered)]


def check_invariants(batches: list[list[int]], lengths: list[int], batch_size: int, max_spread: int) -> None:
    flat = [index for batch in batches for index in batch]
    assert sorted(flat) == list(range(len(lengths))), "every index must appear exactly once per epoch"
    for batch in batches:
        assert 1 <= len(batch) <= batch_size, f"a batch of {len(batch)} indices, batch_size {batch_size}"
        spread = max(lengths[i] for i in batch) - min(lengths[i] for i in batch)
        assert spread <= max_spread, f"a batch has length spread {spread} > max_spread {max_spread}"


@SETTINGS
@given(
    lengths=LENGTHS,
    batch_size=st.integers(1, 12),
    max_spread=st.integers(0, 30),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_batches_respect_size_spread_and_cover_every_index_once(
    submission: Submission, lengths: list[int], batch_size: int, max_spread: int, shuffle: bool, seed: int
) -> None:
    bucket_sampler = sampler(submission, lengths, batch_size, max_spread, shuffle=shuffle, seed=seed)
    batches = epoch(submission, bucket_sampler)
    check_invariants(batches, lengths, batch_size, max_spread)
    fewest = fewest_batches(lengths, batch_size, max_spread)
    assert len(batches) == fewest, f"{len(batches)} batches; the fewest possible is {fewest}"
    assert count(bucket_sampler) == len(batches), "len(sampler) must be the number of batches of an epoch"


@SETTINGS
@given(lengths=LENGTHS, batch_size=st.integers(1, 12), max_spread=st.integers(0, 30))
def test_unshuffled_batches_follow_the_definition(
    submission: Submission, lengths: list[int], batch_size: int, max_spread: int
) -> None:
    bucket_sampler = sampler(submission, lengths, batch_size, max_spread, shuffle=False)
    expected = reference_batches(lengths, batch_size, max_spread)
    assert epoch(submission, bucket_sampler) == expected, "the unshuffled batches differ from the definition"
    assert epoch(submission, bucket_sampler) == expected, "a second epoch must give the same batches"


def seeded_lengths(n: int) -> list[int]:
    """A long-tailed length distribution, like tokenised documents."""
    generator = torch.Generator().manual_seed(n)
    return (torch.empty(n).log_normal_(mean=4.0, std=1.0, generator=generator).long() + 1).tolist()


def length_profile(batches: list[list[int]], lengths: list[int]) -> list[tuple[int, ...]]:
    return sorted(tuple(sorted(lengths[i] for i in batch)) for batch in batches)


def test_shuffle_permutes_ties_and_batch_order_only(submission: Submission) -> None:
    """Shuffling changes which of equal-length indices go together and the batch order, not the batch lengths."""
    lengths = seeded_lengths(2000)
    plain = reference_batches(lengths, 16, 8)
    shuffled = epoch(submission, sampler(submission, lengths, 16, 8, shuffle=True, seed=1))
    check_invariants(shuffled, lengths, 16, 8)
    assert length_profile(shuffled, lengths) == length_profile(plain, lengths), (
        "shuffled batches must hold the same lengths as unshuffled ones"
    )
    assert shuffled != plain, "shuffle=True must change the batches"
    firsts = [lengths[batch[0]] for batch in shuffled]
    assert firsts != sorted(firsts), "the batch order must be shuffled"
    ties = [sorted(batch) for batch in shuffled]
    assert sorted(ties) != sorted(sorted(batch) for batch in plain), (
        "indices of equal length must be shuffled"
    )


def test_shuffle_is_a_function_of_seed_and_epoch(submission: Submission) -> None:
    lengths = seeded_lengths(1000)

    def shuffled(seed: int, number: int) -> list[list[int]]:
        bucket_sampler = sampler(submission, lengths, 8, 4, shuffle=True, seed=seed)
        bucket_sampler.call("set_epoch", number)
        return epoch(submission, bucket_sampler)

    assert shuffled(7, 0) == shuffled(7, 0), "the same seed and epoch must give the same batches"
    assert shuffled(7, 3) == shuffled(7, 3), "the same seed and epoch must give the same batches"
    assert shuffled(7, 0) != shuffled(7, 1), "set_epoch must change the order"
    assert shuffled(7, 0) != shuffled(8, 0) or shuffled(7, 1) != shuffled(8, 1), (
        "the seed must change the order"
    )
    bucket_sampler = sampler(submission, lengths, 8, 4, shuffle=True, seed=7)
    first = epoch(submission, bucket_sampler)
    assert epoch(submission, bucket_sampler) == first, "iterating twice without set_epoch repeats the epoch"


@pytest.mark.parametrize(("lengths", "expected"), [([], []), ([17], [[0]]), ([0], [[0]])])
def test_empty_and_single_item(submission: Submission, lengths: list[int], expected: list[list[int]]) -> None:
    for shuffle in (False, True):
        bucket_sampler = sampler(submission, lengths, 4, 2, shuffle=shuffle)
        assert epoch(submission, bucket_sampler) == expected, f"lengths {lengths}: expected {expected}"
        assert count(bucket_sampler) == len(expected), (
            f"lengths {lengths}: len(sampler) must be {len(expected)}"
        )


def test_works_as_a_dataloader_batch_sampler(submission: Submission) -> None:
    lengths = seeded_lengths(300)
    bucket_sampler = sampler(submission, lengths, 8, 5, shuffle=True, seed=0)
    seen = submission.run(
        bucketing.dataloader_epoch, bucket_sampler, lengths, returns=dict[str, bool | int | list[int]]
    )
    assert seen["is_sampler"] is True, "the sampler must be a torch.utils.data.Sampler"
    assert sorted(seen["seen"]) == list(range(len(lengths))), (
        "a DataLoader epoch must see every sequence once"
    )
    most = 5 * (len(lengths) - len(reference_batches(lengths, 8, 5)))
    assert seen["padding"] <= most, "at most max_spread padding per sequence that is not its batch's longest"


@pytest.mark.parametrize(
    ("lengths", "batch_size", "max_spread"), [([3, 4], 0, 1), ([3, 4], 2, -1), ([3, -4], 2, 1)]
)
def test_bad_arguments_raise_value_error(
    submission: Submission, lengths: list[int], batch_size: int, max_spread: int
) -> None:
    with raises("ValueError"):
        submission.new(SAMPLER, lengths, batch_size, max_spread)
