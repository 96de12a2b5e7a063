"""Hidden tests of `fastinfer.speculative.speculative_greedy` on a GPU (task speculative_speed).

A 16-layer target and a 2-layer draft made of its first layers, float32 on the GPU (`scenarios/
speculative.py`): the draft guesses most of the target's choices, not all. The checker times, the same way
and alternately (`timing.py`), the submission's speculative decoding (its worker, called from here) and plain
greedy decoding of the target with the course's static KV cache (`common.inference.generate`, here), both
eager, 128 new tokens. Speculative decoding must be at least 1.5x faster.

The tokens are checked against the target itself, here: each new token must be the target's greedy choice
given the tokens before it, up to a near-tie. On a GPU a forward over five tokens and one over one token use
different kernels, so their fp32 logits differ by ~1e-5 and a near-tie may go either way; 1e-3 is far above
that and far below the gaps a wrong token leaves.
"""

from __future__ import annotations

import pytest
import timing
import torch
from scenarios import speculative

from common.grading.client import Submission
from common.inference.generate import generate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
SEED, NEW, DRAFT_LEN = 5, 128, 4
PROMPT = list(range(100, 116))
NEAR_TIE = 1e-3
SEEN = dict[str, torch.Tensor | list[list[int | list[int]]] | int]


@pytest.fixture
def target(submission: Submission) -> torch.nn.Module:
    """The target, here, and the same models built in the worker."""
    submission.run(speculative.prepare_speed, SEED, returns=type(None))
    return speculative.speed_models(SEED, "cuda")[0]


def decode(submission: Submission) -> dict:
    return submission.run(speculative.decode_speed, PROMPT, NEW, DRAFT_LEN, returns=SEEN)


def test_tokens_are_the_targets_greedy_choices(submission: Submission, target: torch.nn.Module) -> None:
    tokens = decode(submission)["tokens"]
    assert type(tokens) is torch.Tensor and tokens.shape == (len(PROMPT) + NEW,), (
        f"expected {len(PROMPT) + NEW} tokens, got {list(getattr(tokens, 'shape', []))}"
    )
    vocab = (
        speculative.SPEED_CONFIG.vocab_size
    )  # checked here, before the checker's own GPU forward uses them
    assert tokens.dtype == torch.long and bool(((tokens >= 0) & (tokens < vocab)).all()), (
        f"expected token ids (int64, 0 to {vocab - 1}), got {tokens.dtype} from {int(tokens.min())} to "
        f"{int(tokens.max())}"
    )
    assert tokens[: len(PROMPT)].tolist() == PROMPT, "the returned sequence must start with the prompt"
    with torch.no_grad():
        logits = target(tokens[None, :-1].cuda())[0, len(PROMPT) - 1 :].double().cpu()  # (NEW, vocab)
    chosen = logits.gather(1, tokens[len(PROMPT) :, None])[:, 0]
    short = logits.max(1).values - chosen  # 0 where the token is the argmax
    wrong = (short > NEAR_TIE).nonzero()
    assert len(wrong) == 0, (
        f"new token {int(wrong[0])} is not the target's greedy choice (its logit is {float(short[wrong[0]]):.3g} "
        "below the best)"
    )


def test_faster_than_plain_decoding(submission: Submission, target: torch.nn.Module) -> None:
    prompt = torch.tensor([PROMPT], device="cuda")

    def plain(reps: int) -> None:
        for _ in range(reps):
            generate(target, prompt, NEW)
        torch.cuda.synchronize()

    def ours(reps: int) -> None:
        for _ in range(reps):
            decode(submission)

    plain(1), ours(1)  # warm-up: cuBLAS and the caching allocator settle
    ratio = timing.median_speedup(ours, plain, reps=2, trials=3)
    assert ratio >= 1.5, (
        f"speculative decoding ran at {ratio:.2f}x the speed of plain greedy decoding; needed 1.5x"
    )
