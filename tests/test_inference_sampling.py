"""common.inference.sampling: each rule's distribution against an exact enumeration, and the sampler
against the distribution it is given.

The enumeration is written from the definitions in plain Python floats (float64): sort the tokens, keep the
top k, walk down the sorted list until the kept mass reaches p, renormalise. The library computes in fp32;
a softmax over 10 logits is within a few fp32 ulps (1.2e-7 each) of the exact one, so 1e-6 absolute.
The sampler is checked with the total-variation test of tests/distribution_check.py (its docstring states
the test, the significance level and how the sample size is chosen for the power against a wrong sampler).
"""

from __future__ import annotations

import math

import pytest
import torch
from distribution_check import looks_like, samples_needed

from common.inference.sampling import Sampling, sample

VOCAB = 10


def reference_probs(row: list[float], rule: Sampling) -> list[float]:
    """The distribution of `rule` over one row of logits, by enumeration in float64."""
    if rule.greedy:
        best = row.index(max(row))
        return [1.0 if i == best else 0.0 for i in range(len(row))]
    scaled = [x / rule.temperature for x in row]
    order = sorted(range(len(row)), key=lambda i: -scaled[i])
    kept = order[: rule.top_k] if rule.top_k is not None else order
    weights = {i: math.exp(scaled[i]) for i in kept}
    total = sum(weights.values())
    probs = {i: w / total for i, w in weights.items()}
    if rule.top_p is not None:
        nucleus, mass = [], 0.0
        for i in kept:  # most likely first
            nucleus.append(i)
            mass += probs[i]
            if mass >= rule.top_p:
                break
        total = sum(probs[i] for i in nucleus)
        probs = {i: probs[i] / total for i in nucleus}
    return [probs.get(i, 0.0) for i in range(len(row))]


RULES = [
    Sampling(),
    Sampling(temperature=0),
    Sampling(temperature=0.5),
    Sampling(temperature=2.0),
    Sampling(top_k=1),
    Sampling(top_k=3),
    Sampling(top_p=0.5),
    Sampling(top_p=0.9, temperature=0.7),
    Sampling(top_k=4, top_p=0.8, temperature=1.5),
]


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_probs_equal_exact_enumeration(rule: Sampling):
    logits = 2 * torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(0))
    probs = rule.probs(logits)
    expected = torch.tensor([reference_probs(row, rule) for row in logits.tolist()], dtype=torch.float64)
    torch.testing.assert_close(probs.double(), expected, rtol=0, atol=1e-6)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(6), rtol=0, atol=1e-6)


def test_probs_keep_leading_dimensions():
    logits = torch.randn(2, 3, VOCAB, generator=torch.Generator().manual_seed(1))
    rule = Sampling(top_k=3, top_p=0.7)
    torch.testing.assert_close(rule.probs(logits), rule.probs(logits.view(6, VOCAB)).view(2, 3, VOCAB))


def test_ties_greedy_picks_the_first_and_top_k_keeps_ties_with_the_kth():
    logits = torch.tensor([1.0, 3.0, 3.0, 0.0])
    assert Sampling(temperature=0).probs(logits).tolist() == [0.0, 1.0, 0.0, 0.0]
    kept = Sampling(top_k=2).probs(torch.tensor([3.0, 2.0, 2.0, 1.0])) > 0
    assert kept.tolist() == [True, True, True, False]


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    for top_p, n_kept in [(0.45, 1), (0.55, 2), (0.79, 2), (0.81, 3), (0.96, 4), (1.0, 4)]:
        kept = (Sampling(top_p=top_p).probs(logits) > 0).sum().item()
        assert kept == n_kept, f"top_p={top_p}: kept {kept} tokens, expected {n_kept}"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be >= 0"),
        ({"top_k": 0}, "top_k must be >= 1"),
        ({"top_k": 2.5}, "top_k must be an int"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_rules_are_refused_with_the_value(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)


def test_top_k_larger_than_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="top_k=11 is larger than the vocabulary"):
        Sampling(top_k=11).probs(torch.zeros(VOCAB))
    with pytest.raises(ValueError, match="top_k=11 is larger than the vocabulary"):  # greedy's shortcut too
        Sampling(temperature=0, top_k=11).next_token(torch.zeros(VOCAB))


@pytest.mark.parametrize(
    "rule", [Sampling(), Sampling(top_k=3), Sampling(top_p=0.6, temperature=0.8)], ids=str
)
def test_sample_draws_from_the_given_distribution_and_tells_a_wrong_one(rule: Sampling):
    """Draws from rule.probs(logits) pass the TV test; draws from the unfiltered softmax (the wrong
    sampler: a filter forgotten, or for the plain rule the temperature 1.3 instead of 1) fail it. The
    sample size is at least the one that gives the test power 1 - 1e-3 against that wrong sampler, and at
    least 50,000 so that any error in the sampler larger than about 0.02 in TV is caught too."""
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(2))
    probs = rule.probs(logits)
    wrong = Sampling(temperature=1.3 if rule == Sampling() else rule.temperature).probs(logits)
    needed = samples_needed(probs, wrong)
    assert needed <= 200_000, f"the wrong sampler is too close to tell apart cheaply ({needed} samples)"
    n = max(needed, 50_000)
    generator = torch.Generator().manual_seed(3)
    draws = sample(probs.expand(n, VOCAB), generator)
    accepted, numbers = looks_like(draws, probs)
    assert accepted, numbers
    assert (probs[draws] > 0).all(), "a token of probability 0 was drawn"
    rejected, numbers = looks_like(sample(wrong.expand(n, VOCAB), generator), probs)
    assert not rejected, f"the wrong sampler passed: {numbers}"


def test_sample_is_seeded():
    probs = Sampling(top_k=5).probs(torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(4)))
    first = sample(probs, torch.Generator().manual_seed(5))
    assert torch.equal(first, sample(probs, torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("rule", [Sampling(temperature=0), Sampling(temperature=0.7, top_k=3)])
def test_next_token_is_what_sampling_the_distribution_gives(rule: Sampling):
    """next_token against sample(probs) with the same generator state: greedy's shortcut (the argmax,
    no one-hot, no draw) picks the same tokens, ties included (few logit values, many ties)."""
    logits = torch.randint(0, 3, (512, 5), generator=torch.Generator().manual_seed(0)).float()
    expected = sample(rule.probs(logits), torch.Generator().manual_seed(1))
    assert torch.equal(rule.next_token(logits, torch.Generator().manual_seed(1)), expected)
