"""common.inference.speculative, greedy: token-identical to the target's own greedy decoding.

The reference recomputes everything without a cache: greedy decoding of the target alone, and the rounds of
speculative decoding written from their definition (the draft proposes k argmax tokens, the target's argmax
at each of those positions decides how many are kept), which gives the expected number of accepted tokens.
Token equality is meaningful only when no argmax met on the way is a near tie: each reference checks its
smallest top-2 gap against 1e-5, ten times the cached-vs-recomputed logit difference (test_inference_kv_cache).
"""

from __future__ import annotations

import math

import pytest
import torch
from inference_toys import CONFIG, greedy_without_cache, perturbed_copy, random_llama, random_prompt

from common.inference.generate import generate
from common.inference.kv_cache import CachedDecoder
from common.inference.speculative import (
    SpeculativeStats,
    expected_tokens_per_round,
    speculative_generate,
)
from common.models.llama import Llama, LlamaConfig

PROMPT_LEN, NEW_TOKENS = 4, 24
MIN_GAP = 1e-5


def argmax_and_gap(logits: torch.Tensor) -> tuple[torch.Tensor, float]:
    top2 = logits.topk(2, dim=-1).values
    return logits.argmax(-1), (top2[..., 0] - top2[..., 1]).min().item()


@torch.no_grad()
def speculative_rounds_without_cache(
    target: Llama, draft: Llama, prompt: torch.Tensor, n_new: int, draft_len: int
) -> tuple[torch.Tensor, list[int], float]:
    """Greedy speculative decoding from its definition, no cache: tokens, accepted count of each round, and
    the smallest argmax gap met."""
    sequence, accepted, smallest_gap = prompt, [], float("inf")
    while sequence.shape[1] < prompt.shape[1] + n_new:
        n, proposal = sequence.shape[1], sequence
        for _ in range(draft_len):
            token, gap = argmax_and_gap(draft(proposal)[:, -1])
            proposal, smallest_gap = torch.cat([proposal, token[:, None]], 1), min(smallest_gap, gap)
        choices, gap = argmax_and_gap(target(proposal)[:, n - 1 :])  # (1, draft_len + 1)
        smallest_gap = min(smallest_gap, gap)
        drafts = proposal[0, n:]
        kept = 0
        while kept < draft_len and drafts[kept] == choices[0, kept]:
            kept += 1
        sequence = torch.cat([sequence, drafts[None, :kept], choices[:, kept : kept + 1]], 1)
        accepted.append(kept)
    return sequence[:, : prompt.shape[1] + n_new], accepted, smallest_gap


@pytest.mark.parametrize("draft_len", [1, 2, 4, 7])
def test_greedy_speculative_equals_greedy_and_counts_what_the_definition_counts(draft_len: int):
    target = random_llama(10)
    draft = perturbed_copy(target, noise=0.2, seed=11)
    prompt = random_prompt(CONFIG, 1, PROMPT_LEN, seed=12)
    expected, target_gap = greedy_without_cache(target, prompt, NEW_TOKENS)
    rounds_tokens, accepted, rounds_gap = speculative_rounds_without_cache(
        target, draft, prompt, NEW_TOKENS, draft_len
    )
    assert min(target_gap, rounds_gap) > MIN_GAP, "a near tie would make token equality a coin flip"
    assert torch.equal(rounds_tokens, expected), "the reference itself must agree with greedy decoding"
    assert 0 < sum(accepted) < len(accepted) * draft_len, "the draft should be kept sometimes, not always"

    tokens, stats = speculative_generate(target, draft, prompt, NEW_TOKENS, draft_len)
    assert torch.equal(tokens, expected)
    assert torch.equal(generate(target, prompt, NEW_TOKENS), expected)
    assert stats == SpeculativeStats(
        rounds=len(accepted), drafted=len(accepted) * draft_len, accepted=sum(accepted)
    )


@pytest.mark.parametrize("draft_len", [1, 3])
def test_terrible_draft_is_always_rejected_and_changes_nothing(draft_len: int):
    """The draft's output projection is zero: all logits equal, so its argmax is always token 0. The
    target's output row for token 0 is zero too, so token 0's logit is 0 while the best of the other 31
    (std ~1) is positive: the target never picks 0 (checked below), and every draft token is rejected."""
    target, draft = random_llama(13), random_llama(14)
    with torch.no_grad():
        draft.output.weight.zero_()
        target.output.weight[0].zero_()
    prompt = random_prompt(CONFIG, 1, PROMPT_LEN, seed=15)
    expected, gap = greedy_without_cache(target, prompt, NEW_TOKENS)
    assert gap > MIN_GAP and (expected[0, PROMPT_LEN:] != 0).all(), (
        "the test needs a target that never picks 0"
    )
    tokens, stats = speculative_generate(target, draft, prompt, NEW_TOKENS, draft_len)
    assert torch.equal(tokens, expected)
    assert stats == SpeculativeStats(rounds=NEW_TOKENS, drafted=NEW_TOKENS * draft_len, accepted=0)
    assert stats.tokens_per_round == 1.0


@pytest.mark.parametrize("draft_len", [1, 3, 5])
def test_draft_equal_to_target_is_always_accepted(draft_len: int):
    target = random_llama(16)
    prompt = random_prompt(CONFIG, 1, PROMPT_LEN, seed=17)
    expected, gap = greedy_without_cache(target, prompt, NEW_TOKENS)
    assert gap > MIN_GAP, "a near tie would make token equality a coin flip"
    tokens, stats = speculative_generate(target, target, prompt, NEW_TOKENS, draft_len)
    assert torch.equal(tokens, expected)
    rounds = math.ceil(NEW_TOKENS / (draft_len + 1))  # each round: draft_len kept + the target's bonus token
    assert stats == SpeculativeStats(rounds=rounds, drafted=rounds * draft_len, accepted=rounds * draft_len)
    assert stats.acceptance_rate == 1.0
    assert stats.tokens_per_round == draft_len + 1 == expected_tokens_per_round(1.0, draft_len)


def test_compiled_decoders_see_few_shapes_and_change_nothing():
    """Decoders compiled with fullgraph=True (a graph break fails) and static shapes: the target sees
    s + k tokens once and then 1 + k; the draft s once, then 1 or 2. So five graphs serve every round."""
    graphs = []

    def counting_backend(graph_module: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph_module)
        return graph_module.forward

    target = random_llama(20)
    draft = perturbed_copy(target, noise=0.2, seed=21)
    prompt = random_prompt(CONFIG, 1, PROMPT_LEN, seed=22)
    expected, stats = speculative_generate(target, draft, prompt, NEW_TOKENS, 3)
    torch._dynamo.reset()
    decoders = {}
    for name, model in (("target_decoder", target), ("draft_decoder", draft)):
        decoders[name] = CachedDecoder(model, batch_size=1, max_len=PROMPT_LEN + NEW_TOKENS + 3 - 1)
        decoders[name].compile(backend=counting_backend, fullgraph=True, dynamic=False)
    tokens, compiled_stats = speculative_generate(target, draft, prompt, NEW_TOKENS, 3, **decoders)
    torch._dynamo.reset()
    assert torch.equal(tokens, expected) and compiled_stats == stats
    assert 0 < stats.accepted < stats.drafted, "the rounds should include partial acceptances"
    assert len(graphs) <= 5, f"{len(graphs)} graphs: some shape depends on a value"


def test_expected_tokens_per_round_is_the_geometric_sum():
    for alpha in (0.0, 0.3, 0.9):
        for k in (1, 4):
            assert expected_tokens_per_round(alpha, k) == pytest.approx(sum(alpha**i for i in range(k + 1)))
    with pytest.raises(ValueError, match="alpha is a probability, got 1.5"):
        expected_tokens_per_round(1.5, 2)


def test_errors_name_the_problem():
    target = random_llama(18)
    prompt = random_prompt(CONFIG, 1, PROMPT_LEN)
    with pytest.raises(ValueError, match="one sequence at a time; the prompt has 2"):
        speculative_generate(target, target, random_prompt(CONFIG, 2, PROMPT_LEN), 4, 2)
    other_vocab = random_llama(19, LlamaConfig(**{**CONFIG.__dict__, "vocab_size": 16}))
    with pytest.raises(ValueError, match=r"the draft's vocabulary \(16 tokens\) is not the target's \(32\)"):
        speculative_generate(target, other_vocab, prompt, 4, 2)
    with pytest.raises(ValueError, match="draft_len=0 and max_new_tokens=4 must both be >= 1"):
        speculative_generate(target, target, prompt, 4, 0)
    with pytest.raises(ValueError, match="need 50 positions, more than the target's max_seq_len=48"):
        speculative_generate(target, target, prompt, 40, 7)
