"""common.inference.graphed_decoder: hand-captured CUDA graphs give the logits and tokens of eager decoding.

The reference is CachedDecoder run eagerly on the same model: the same cache semantics, no graphs, no
compiler. Compiled kernels may sum in another order than eager ones, so logits are compared to 1e-4 of the
largest logit (fp32 rounding differences are ~1e-6 of it; a stale start position, a graph replayed with
old tokens or a cache written at the wrong positions moves logits by O(0.1)).
"""

from __future__ import annotations

import pytest
import torch
from inference_toys import greedy_without_cache, perturbed_copy, random_llama, random_prompt

from common.inference.generate import generate
from common.inference.graphed_decoder import GraphedDecoder
from common.inference.kv_cache import ATTENTION_FORMS, CachedDecoder
from common.inference.speculative import speculative_generate
from common.models.llama import LlamaConfig

GPU_CONFIG = LlamaConfig(
    vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256, max_seq_len=256
)


def test_a_model_off_the_gpu_is_refused_with_the_alternative():
    with pytest.raises(ValueError, match="CUDA graphs.*use CachedDecoder"):
        GraphedDecoder(random_llama(0), batch_size=1, max_len=8)


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ATTENTION_FORMS)
@pytest.mark.parametrize("compile", [False, True], ids=["eager-graphs", "compiled-graphs"])
def test_graphed_feeds_and_rollbacks_give_eager_logits_gpu(compile: bool, attention: str):
    """Feeds of several lengths (each length's graph replayed at other positions), rollbacks that rewrite
    positions: every feed's logits are eager SDPA decoding's, whichever attention form the graphs compute
    (the reductions form is what the quantization benchmark compiles), and the length bookkeeping the same."""
    model = random_llama(3, GPU_CONFIG).cuda()
    sequence = random_prompt(GPU_CONFIG, batch=2, length=40, seed=4).cuda()
    other = random_prompt(GPU_CONFIG, batch=2, length=40, seed=5).cuda()
    eager = CachedDecoder(model, batch_size=2, max_len=48)
    graphed = GraphedDecoder(model, batch_size=2, max_len=48, compile=compile, attention=attention)
    # (tokens to feed from, size) or ("rollback", length): prefill, single steps, chunks, rewritten positions
    schedule = [(sequence, 6), (sequence, 1), (sequence, 3), (sequence, 1), ("rollback", 5), (other, 3),
                (other, 1), ("rollback", 2), (sequence, 6), (sequence, 3), (sequence, 1), (sequence, 1)]  # fmt: skip
    with torch.no_grad():
        for source, size in schedule:
            if isinstance(source, str):
                eager.rollback(size)
                graphed.rollback(size)
                continue
            start = eager.length
            expected = eager.feed(source[:, start : start + size])
            actual = graphed.feed(source[:, start : start + size])
            assert graphed.length == eager.length
            torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4 * expected.abs().max().item())


@pytest.mark.gpu
def test_graphed_decoders_generate_and_speculate_the_greedy_tokens_gpu():
    """generate and speculative_generate on graphed decoders, twice each (the second run only replays):
    the tokens of greedy decoding recomputed without a cache."""
    target = random_llama(7, GPU_CONFIG)
    draft = perturbed_copy(target, noise=0.2, seed=8).cuda()
    target = target.cuda()
    prompt = random_prompt(GPU_CONFIG, 1, 16, seed=9).cuda()
    expected, smallest_gap = greedy_without_cache(target, prompt, 32)
    assert smallest_gap > 1e-4, f"a near tie ({smallest_gap:.1e}) would make token equality a coin flip"
    target_decoder = GraphedDecoder(target, batch_size=1, max_len=16 + 32 + 3)
    draft_decoder = GraphedDecoder(draft, batch_size=1, max_len=16 + 32 + 3)
    with torch._dynamo.config.patch(recompile_limit=64):
        for _ in range(2):
            assert torch.equal(generate(target, prompt, 32, decoder=target_decoder), expected)
            for draft_len in (1, 4):
                tokens, stats = speculative_generate(
                    target, draft, prompt, 32, draft_len,
                    target_decoder=target_decoder, draft_decoder=draft_decoder,
                )  # fmt: skip
                assert torch.equal(tokens, expected), f"draft_len={draft_len}"
                assert 0 < stats.accepted < stats.drafted, "a partly right draft exercises both branches"
