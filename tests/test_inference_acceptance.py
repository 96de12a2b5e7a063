"""common.inference.toy_language and the acceptance experiment of common.inference.acceptance.

The language is checked against its own definition: the joint distribution of three-token sequences is
1/V^2 * table[a, b, c] (uniform pair, then the chain), compared by enumeration of all V^3 sequences with the
total-variation test of tests/distribution_check.py (significance 1e-3). The experiment runs with budgets of a
few steps: what is checked is the bookkeeping (alpha is 1 for a draft equal to the target; the prediction is
the formula at the measured alpha), not how well a few steps train.
"""

from __future__ import annotations

import math

import pytest
import torch
from distribution_check import looks_like
from inference_toys import random_llama

from common.inference.acceptance import AcceptanceExperiment, main, mean_alpha, run
from common.inference.sampling import PLAIN, Sampling
from common.inference.speculative import expected_tokens_per_round
from common.inference.toy_language import TrigramLanguage


def test_language_table_has_the_stated_structure_and_is_seeded():
    language = TrigramLanguage(vocab_size=8, branching=3, seed=1)
    table = language.table
    assert table.shape == (8, 8, 8)
    torch.testing.assert_close(table.sum(-1), torch.ones(8, 8))
    assert ((table > 0).sum(-1) == 3).all(), "exactly `branching` tokens may follow each pair"
    assert torch.equal(TrigramLanguage(vocab_size=8, branching=3, seed=1).table, table)
    assert not torch.equal(TrigramLanguage(vocab_size=8, branching=3, seed=2).table, table)


def test_sampled_sequences_follow_the_chain():
    language = TrigramLanguage(vocab_size=4, branching=2, seed=3)
    tokens = language.sample(100_000, 3, torch.Generator().manual_seed(4))
    joint = (language.table / 16).flatten()  # P(a, b, c) = 1/V^2 * table[a, b, c], by enumeration
    index = (tokens[:, 0] * 4 + tokens[:, 1]) * 4 + tokens[:, 2]
    accepted, numbers = looks_like(index, joint)
    assert accepted, numbers
    longer = language.sample(50, 20, torch.Generator().manual_seed(5))
    assert (language.next_token_probs(longer).gather(-1, longer[:, 2:, None]) > 0).all()
    expected = -sum(
        math.log(language.table[row[t - 2], row[t - 1], row[t]].item())
        for row in longer
        for t in range(2, 20)
    ) / (50 * 18)
    assert language.loss(longer) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"vocab_size": 1}, "vocab_size must be >= 2"),
        ({"branching": 40}, r"branching must be in \[1, vocab_size=32\]"),
    ],
)
def test_bad_language_is_refused(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        TrigramLanguage(**kwargs)


@pytest.mark.parametrize("sampling", [PLAIN, Sampling(temperature=0)], ids=str)
def test_alpha_is_one_for_a_draft_equal_to_the_target_and_below_for_another(sampling: Sampling):
    target, other = random_llama(30), random_llama(31)
    sequences = torch.randint(32, (3, 12), generator=torch.Generator().manual_seed(6))
    assert mean_alpha(target, target, sequences, 4, sampling) == pytest.approx(1.0, abs=1e-6)
    assert mean_alpha(target, other, sequences, 4, sampling) < 0.9


def test_experiment_reports_the_formula_at_the_measured_alpha():
    experiment = AcceptanceExperiment(target_steps=3, draft_steps=2, n_prompts=2, new_tokens=6, draft_len=3)
    results = run(experiment)
    assert 0 <= results["alpha"] <= 1 and 0 <= results["acceptance_rate"] <= 1
    assert 1 <= results["tokens_per_round"] <= experiment.draft_len + 1
    assert results["predicted_tokens_per_round"] == expected_tokens_per_round(results["alpha"], 3)
    assert results["language_loss"] < results["target_loss"], "a few steps cannot beat the true chain"


def test_command_help_and_a_short_run(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--draft-len" in capsys.readouterr().out
    assert main(["--target-steps", "2", "--draft-steps", "1", "--prompts", "1", "--new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "tokens per target forward: measured" in out and "predicted (1 - alpha^5) / (1 - alpha)" in out


def test_mismatched_vocabularies_are_refused():
    with pytest.raises(ValueError, match="the target's vocab_size=16 is not the language's 32"):
        AcceptanceExperiment(language=TrigramLanguage(vocab_size=32))
