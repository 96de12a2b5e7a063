"""Hidden tests of `fastinfer.speculative.speculative_greedy` (task speculative, CPU).

The submission decodes in its worker with two logged `Decoder`s (`scenarios/speculative.py`); everything it
is judged against is computed here, on the same models built from the same seed:

- the tokens: greedy decoding of the target alone (`common.inference.generate`), token for token;
- the target's forwards: exactly one per round, and exactly as many rounds as greedy speculative decoding
  takes with this draft. That count is computed here from the definition: from each prefix the draft
  proposes its own greedy continuation, the target keeps the leading run that equals its greedy choices and
  adds one token. A draft whose cache is stale proposes worse, a round that drops the bonus token or a loop
  that runs the target once per token takes more rounds;
- the target's cache at each forward (replayed from the log: each extend starts at the cache's length and
  writes after it): it must hold only tokens of the returned sequence, so rejected proposals were truncated.

Drafts: a copy of the target (every proposal kept), a perturbed copy (about half kept), an unrelated model
(few kept). float64 models: a forward over several tokens and one over one token agree to ~1e-15, far below
the gaps between logits, so greedy choices do not depend on how the tokens were batched.
"""

from __future__ import annotations

import functools

import pytest
import torch
from scenarios import speculative

from common.grading.client import Submission, raises
from common.inference.generate import generate

SEED = 11
PROMPT = [7, 3, 3, 40, 12]
NEW = 13  # not a multiple of draft_len + 1 for any draft_len here: the last round is cut off
SEEN = dict[str, torch.Tensor | list[list[int | list[int]]] | int]


@functools.cache
def expected(
    seed: int, draft: str, prompt: tuple[int, ...], new: int, draft_len: int
) -> tuple[list[int], int]:
    """Greedy decoding of the target, and the number of rounds greedy speculative decoding takes."""
    target, draft_model = speculative.models(seed, draft)
    greedy = generate(target, torch.tensor([prompt]), new)[0]
    n, rounds, end = len(prompt), 0, len(prompt) + new
    while n < end:
        proposal = generate(draft_model, greedy[None, :n], draft_len)[0, n:]
        choices = greedy[n : n + draft_len]  # the target's greedy choices after each kept proposal
        n += int((proposal[: len(choices)] == choices).long().cumprod(0).sum()) + 1
        rounds += 1
    return greedy.tolist(), rounds


def decode(submission: Submission, draft: str, draft_len: int, prompt: list[int] = PROMPT,
           new: int = NEW) -> tuple[dict, list[int], int]:  # fmt: skip
    seen = submission.run(speculative.decode, SEED, draft, prompt, new, draft_len, returns=SEEN)
    tokens = seen["tokens"]
    assert type(tokens) is torch.Tensor and tokens.dtype == torch.long and tokens.dim() == 1, (
        f"speculative_greedy must return a 1-D long tensor, got {getattr(tokens, 'dtype', type(tokens))} "
        f"of shape {list(getattr(tokens, 'shape', []))}"
    )
    greedy, rounds = expected(SEED, draft, tuple(prompt), new, draft_len)
    return seen, greedy, rounds


def check_tokens(tokens: torch.Tensor, greedy: list[int], prompt_len: int) -> None:
    assert len(tokens) == len(greedy), (
        f"expected {len(greedy)} tokens (prompt and new ones), got {len(tokens)}"
    )
    ours = tokens.tolist()
    assert ours[:prompt_len] == greedy[:prompt_len], "the returned sequence must start with the prompt"
    wrong = next((i for i, (a, b) in enumerate(zip(ours, greedy, strict=True)) if a != b), None)
    assert wrong is None, (
        f"new token {wrong - prompt_len} is {ours[wrong]}; greedy decoding of the target gives {greedy[wrong]}"
    )


def check_target_cache(log: list, final_length: int, greedy: list[int]) -> None:
    """Replay the target's extends: before each, the cache must hold a prefix of the greedy sequence."""
    cache: list[int] = []
    for i, (start, ran) in enumerate(log):
        assert start <= len(cache), f"target extend {i} started at position {start} past the cache's end"
        cache = cache[:start]
        assert cache == greedy[:start], (
            f"at target extend {i} its cache held tokens that are not in the output (positions < {start}): "
            "truncate the target's cache after rejected proposals"
        )
        cache += ran
    kept = min(final_length, len(greedy))  # a last round cut off may leave kept tokens past the end
    assert cache[:kept] == greedy[:kept], (
        "at the end the target's cache held tokens that are not in the output: truncate it after a rejection"
    )


@pytest.mark.parametrize(("draft", "draft_len"), [(draft, k) for draft in speculative.DRAFTS for k in (1, 4)])
def test_greedy_tokens_one_target_forward_per_round_and_no_rejected_token_cached(
    submission: Submission, draft: str, draft_len: int
) -> None:
    seen, greedy, rounds = decode(submission, draft, draft_len)
    check_tokens(seen["tokens"], greedy, len(PROMPT))
    check_target_cache(seen["target_log"], seen["target_length"], greedy)
    forwards = len(seen["target_log"])
    assert forwards == rounds, (
        f"the target ran {forwards} times; greedy speculative decoding with this draft takes {rounds} rounds "
        "of one target forward each (the first also runs the prompt)"
    )


def test_one_new_token_and_a_long_prompt(submission: Submission) -> None:
    for prompt, new in (([5, 9], 1), (list(range(30)), 6)):
        seen, greedy, rounds = decode(submission, "close", 3, prompt, new)
        check_tokens(seen["tokens"], greedy, len(prompt))
        assert len(seen["target_log"]) == rounds, f"{len(seen['target_log'])} target forwards, not {rounds}"


@pytest.mark.parametrize(("draft_len", "new", "named"), [(0, 4, "draft_len"), (2, 0, "max_new_tokens")])
def test_bad_arguments_are_named(submission: Submission, draft_len: int, new: int, named: str) -> None:
    with raises("ValueError") as raised:
        submission.run(speculative.decode, SEED, "other", PROMPT, new, draft_len)
    assert named in raised[0].line, f"the ValueError should name {named}: {raised[0].line!r}"
