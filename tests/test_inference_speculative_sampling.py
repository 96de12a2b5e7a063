"""common.inference.speculative under sampling: the emitted token has the target's distribution.

The claim tested (Leviathan et al. 2023, Theorem 1): after a fixed prefix, the first token a speculative
round emits is distributed as the target's next-token distribution p, whatever the draft. The rounds are
independent rows of one batch (one `speculate` call on N copies of the prefix), p is computed exactly from
the target's logits over a vocabulary of 8, and the empirical distribution of the N first tokens is judged
by the total-variation test of tests/distribution_check.py: significance 1e-3, and N chosen so that the test
rejects each stated wrong sampler with probability >= 1 - 1e-3. Both wrong samplers are then run through the
same code (one function replaced) and must be rejected:

- accept without the rejection step: every draft token kept, so the first token is distributed as q;
- resample from the target instead of the residual: the first token is min(p, q) + (1 - alpha) p, with
  alpha = sum min(p, q): the mass min(p, q) counted twice.
"""

from __future__ import annotations

import math

import pytest
import torch
from distribution_check import ALPHA, looks_like, samples_needed
from inference_toys import random_llama

from common.inference import speculative
from common.inference.kv_cache import CachedDecoder
from common.inference.sampling import GREEDY, PLAIN, Sampling, sample
from common.inference.speculative import acceptance_probability, greedy_verify, speculate, verify
from common.models.llama import LlamaConfig

SMALL_VOCAB = LlamaConfig(
    vocab_size=8, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16
)
PREFIX = torch.tensor([[3, 1, 4]])
DRAFT_LEN = 2
MIN_SAMPLES = 20_000  # at least this many, whatever the power calculation asks: it only adds power


def first_tokens(target, draft, sampling: Sampling, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first token emitted by n independent speculative rounds after PREFIX, and whether the first
    draft token was kept in each."""
    target_decoder = CachedDecoder(target, n, PREFIX.shape[1] + DRAFT_LEN)
    draft_decoder = CachedDecoder(draft, n, PREFIX.shape[1] + DRAFT_LEN)
    draft_tokens, n_accepted, next_token = speculate(
        target_decoder,
        draft_decoder,
        PREFIX.expand(n, -1),
        DRAFT_LEN,
        sampling,
        torch.Generator().manual_seed(seed),
    )
    first_kept = n_accepted > 0
    return torch.where(first_kept, draft_tokens[:, 0], next_token), first_kept


@pytest.mark.parametrize(
    "sampling", [PLAIN, Sampling(temperature=0.7, top_k=5), Sampling(top_p=0.8)], ids=str
)
def test_first_token_has_the_target_distribution_and_wrong_samplers_are_caught(
    sampling: Sampling, monkeypatch: pytest.MonkeyPatch
):
    target, draft = random_llama(20, SMALL_VOCAB), random_llama(21, SMALL_VOCAB)
    with torch.no_grad():
        p = sampling.probs(target(PREFIX)[0, -1]).double()  # exact next-token distributions, no cache
        q = sampling.probs(draft(PREFIX)[0, -1]).double()
    alpha = acceptance_probability(p, q).item()
    wrong = {"keep every draft token": q, "resample from the target": torch.minimum(p, q) + (1 - alpha) * p}
    n = max(MIN_SAMPLES, *(samples_needed(p, w) for w in wrong.values()))
    assert n <= 300_000, f"a wrong sampler is too close to p to be told apart cheaply: {n} samples"

    tokens, first_kept = first_tokens(target, draft, sampling, n, seed=0)
    accepted, numbers = looks_like(tokens, p)
    assert accepted, f"speculative sampling does not reproduce the target's distribution: {numbers}"
    # The first draft token is kept with probability alpha: Hoeffding, two-sided, at the same level.
    assert abs(first_kept.double().mean().item() - alpha) <= math.sqrt(math.log(2 / ALPHA) / (2 * n))

    monkeypatch.setattr(
        speculative, "accepts", lambda u, p_of_draft, q_of_draft: torch.ones_like(u, dtype=bool)
    )
    rejected, numbers = looks_like(first_tokens(target, draft, sampling, n, seed=1)[0], p)
    assert not rejected, f"keeping every draft token went unnoticed: {numbers}"
    monkeypatch.undo()
    monkeypatch.setattr(speculative, "residual_distribution", lambda target_probs, draft_probs: target_probs)
    rejected, numbers = looks_like(first_tokens(target, draft, sampling, n, seed=2)[0], p)
    assert not rejected, f"resampling from the target instead of the residual went unnoticed: {numbers}"


def test_verify_with_disjoint_supports_and_the_bonus_token():
    """verify alone, on hand-made distributions that do not depend on the context, where the draft puts
    mass on a token the target never emits (3) and none on one it does (0). The first emitted token must
    follow p_0 and no token of probability 0 may appear; when the one draft token is kept, the bonus token
    must follow p_1 (the same test, on those rows)."""
    p0 = torch.tensor([0.4, 0.3, 0.3, 0.0])
    q0 = torch.tensor([0.0, 0.2, 0.3, 0.5])
    p1 = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 100_000
    generator = torch.Generator().manual_seed(3)
    draft_tokens = sample(q0.expand(n, 4), generator)[:, None]  # (n, 1)
    target_probs = torch.stack([p0, p1]).expand(n, 2, 4)
    n_accepted, next_token = verify(draft_tokens, q0.expand(n, 1, 4), target_probs, generator)
    first = torch.where(n_accepted > 0, draft_tokens[:, 0], next_token)
    accepted, numbers = looks_like(first, p0)
    assert accepted, numbers
    assert (first != 3).all(), "a token the target gives probability 0 was emitted"
    bonus = next_token[n_accepted == 1]
    accepted, numbers = looks_like(bonus, p1)
    assert accepted, numbers
    alpha = acceptance_probability(p0, q0).item()  # 0.5
    assert abs(bonus.numel() / n - alpha) <= math.sqrt(math.log(2 / ALPHA) / (2 * n))


def test_greedy_verify_is_verify_on_one_hot_distributions():
    """greedy_verify, the temperature-0 shortcut, against verify given the one-hot distributions that
    GREEDY.probs builds: the same counts and tokens on every row. Few logit values, so that many rows hold
    ties (both take the first maximal index) and every count from 0 to k occurs."""
    b, k, vocab = 4096, 3, 3
    generator = torch.Generator().manual_seed(4)
    target_logits = torch.randint(0, 2, (b, k + 1, vocab), generator=generator).float()
    draft_logits = torch.randint(0, 2, (b, k, vocab), generator=generator).float()
    draft_tokens = draft_logits.argmax(-1)
    expected = verify(draft_tokens, GREEDY.probs(draft_logits), GREEDY.probs(target_logits), generator)
    n_accepted, next_token = greedy_verify(draft_tokens, target_logits)
    assert torch.equal(n_accepted, expected[0]) and torch.equal(next_token, expected[1])
    assert set(n_accepted.tolist()) == set(range(k + 1))
