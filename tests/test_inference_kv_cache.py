"""common.inference.kv_cache and generate: cached decoding against recomputing the whole prefix.

The reference is the week-5 model's own forward over the full sequence (causal SDPA over s positions, no
cache); the cached path computes the same sums through a masked attention over max_len positions, in a
different order. In fp32 with logits of magnitude ~3 the two agree to a few ulps of the logits' scale
(at most 3.7e-7 of the largest logit measured, ~1e-6 absolute); 1e-5 of the largest logit is the tolerance, while a wrong position, a stale key or a
missing mask moves logits by O(0.1) or more.
"""

from __future__ import annotations

import pytest
import torch
from inference_toys import CONFIG, greedy_without_cache, random_llama, random_prompt

from common.inference.generate import generate
from common.inference.kv_cache import ATTENTION_FORMS, CachedDecoder
from common.inference.sampling import Sampling
from common.models.llama import LlamaConfig


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("attention", ATTENTION_FORMS)
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])  # multi-head, grouped-query, multi-query
def test_cached_logits_equal_recomputation_over_prefill_and_many_steps(n_kv_heads: int, attention: str):
    config = LlamaConfig(**{**CONFIG.__dict__, "n_kv_heads": n_kv_heads})
    model = random_llama(0, config)
    sequence = random_prompt(config, batch=3, length=30, seed=1)
    decoder = CachedDecoder(model, batch_size=3, max_len=32, attention=attention)
    start = 0
    with torch.no_grad():
        # a prefill of 6, single-token decode steps, and a few chunks of several (as speculative decoding feeds)
        for size in [6, 1, 1, 3, 1, 1, 1, 4, 1, 2, 1, 1, 1, 1, 1, 4]:
            logits = decoder.feed(sequence[:, start : start + size])
            start += size
            assert decoder.length == start
            assert_logits_close(logits, model(sequence[:, :start])[:, -size:])
    assert start == 30


def test_attention_as_reductions_sums_float64_in_float64():
    """Its sums run in fp32 at least, not at most: in float64 both forms agree to float64 rounding, where an
    fp32 sum would leave ~1e-8 of the logits' scale."""
    model = random_llama(5).double()
    prompt = random_prompt(CONFIG, 2, 9, seed=7)
    logits = {}
    with torch.no_grad():
        for form in ATTENTION_FORMS:
            decoder = CachedDecoder(model, batch_size=2, max_len=16, attention=form)
            logits[form] = torch.cat([decoder.feed(prompt[:, :5]), decoder.feed(prompt[:, 5:])], dim=1)
    scale = logits["sdpa"].abs().max().item()
    torch.testing.assert_close(logits["reductions"], logits["sdpa"], rtol=0, atol=1e-12 * scale)


def test_an_unknown_attention_form_is_named():
    with pytest.raises(ValueError, match="unknown attention form 'flash'; choose one of sdpa, reductions"):
        CachedDecoder(random_llama(0), batch_size=1, max_len=8, attention="flash")


def test_rollback_forgets_the_stale_positions():
    model = random_llama(1)
    first, second = random_prompt(CONFIG, 2, 12, seed=2), random_prompt(CONFIG, 2, 5, seed=3)
    decoder = CachedDecoder(model, batch_size=2, max_len=16)
    with torch.no_grad():
        decoder.feed(first)
        decoder.rollback(7)  # positions 7 ... 11 now hold keys of tokens that are no longer there
        logits = decoder.feed(second)
        assert_logits_close(logits, model(torch.cat([first[:, :7], second], dim=1))[:, -5:])


def test_cache_is_allocated_once_and_written_in_place():
    decoder = CachedDecoder(random_llama(2), batch_size=1, max_len=8)
    keys, values = decoder.cache.keys.data_ptr(), decoder.cache.values.data_ptr()
    assert decoder.cache.keys.shape == (CONFIG.n_layers, 1, CONFIG.n_kv_heads, 8, CONFIG.head_dim)
    with torch.no_grad():
        for token in random_prompt(CONFIG, 1, 8, seed=4).unbind(1):
            decoder.feed(token[:, None])
    assert (decoder.cache.keys.data_ptr(), decoder.cache.values.data_ptr()) == (keys, values)
    assert decoder.cache.keys.abs().amin(dim=(0, 1, 2, 4)).gt(0).all(), "every position was written"
    assert "cache.keys" not in decoder.state_dict(), "the cache is state of a run, not of the model"


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_generation_equals_greedy_without_cache(batch: int):
    model = random_llama(3)
    prompt = random_prompt(CONFIG, batch, 5, seed=5)
    expected, smallest_gap = greedy_without_cache(model, prompt, 20)
    # ten times the largest cached-vs-recomputed difference measured (~1e-6): argmax cannot flip below it
    assert smallest_gap > 1e-5, f"a near tie ({smallest_gap:.1e}) would make token equality a coin flip"
    assert torch.equal(generate(model, prompt, 20, Sampling(temperature=0)), expected)


def test_generation_is_seeded_and_reuses_a_decoder_passed_in():
    model = random_llama(4)
    prompt = random_prompt(CONFIG, 2, 4, seed=6)
    rule = Sampling(temperature=0.9, top_k=8)
    first = generate(model, prompt, 10, rule, generator=torch.Generator().manual_seed(0))
    assert first.shape == (2, 14) and torch.equal(first[:, :4], prompt)
    decoder = CachedDecoder(model, batch_size=2, max_len=20)
    decoder.feed(prompt)  # left-over state: generate must start from an empty cache
    again = generate(model, prompt, 10, rule, generator=torch.Generator().manual_seed(0), decoder=decoder)
    assert torch.equal(again, first)


def test_errors_name_the_problem():
    model = random_llama(5)
    with pytest.raises(ValueError, match="max_len=49 positions is longer than the model's max_seq_len=48"):
        CachedDecoder(model, batch_size=1, max_len=49)
    decoder = CachedDecoder(model, batch_size=2, max_len=8)
    with pytest.raises(ValueError, match=r"tokens must be \(batch_size=2, s\), got shape \(1, 3\)"):
        decoder.feed(torch.zeros(1, 3, dtype=torch.long))
    decoder.feed(torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(
        ValueError, match="cannot feed 3 tokens after 6 cached ones: the cache holds max_len=8"
    ):
        decoder.feed(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="cannot roll back to length 7: the cache holds 6 positions"):
        decoder.rollback(7)
    prompt = torch.zeros(2, 10, dtype=torch.long)
    with pytest.raises(
        ValueError, match="needs a cache of batch 2 and max_len >= 14, .* has batch 2 and max_len 8"
    ):
        generate(model, prompt, 5, decoder=decoder)
    with pytest.raises(ValueError, match="need 57 positions, more than the model's max_seq_len=48"):
        generate(model, torch.zeros(1, 50, dtype=torch.long), 8)
    with pytest.raises(ValueError, match=r"token ids in \[0, 32\], outside the vocabulary \[0, 32\)"):
        generate(model, torch.tensor([[0, 32]]), 1)
    with pytest.raises(ValueError, match="prompt must be a \\(batch, s\\) long tensor"):
        generate(model, torch.zeros(4, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(model, prompt, 0)


def test_decode_step_compiles_to_one_graph_per_shape_without_breaks():
    """Positions are tensors, so the steps at positions 5, 6, 7 ... reuse one graph; fullgraph=True fails on
    any graph break. The counting backend runs the captured graph eagerly (no code generation on a CPU)."""
    graphs = []

    def counting_backend(graph_module: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph_module)
        return graph_module.forward

    model = random_llama(6)
    prompt = random_prompt(CONFIG, 1, 5, seed=7)
    expected, _ = greedy_without_cache(model, prompt, 8)
    torch._dynamo.reset()
    decoder = CachedDecoder(model, batch_size=1, max_len=12)
    decoder.compile(backend=counting_backend, fullgraph=True, dynamic=False)
    assert torch.equal(generate(model, prompt, 8, Sampling(temperature=0), decoder=decoder), expected)
    assert len(graphs) == 2, (
        f"expected one graph for the prefill and one for all decode steps, got {len(graphs)}"
    )
    torch._dynamo.reset()


@pytest.mark.gpu
def test_cuda_graphs_generation_equals_greedy_without_cache_gpu():
    """On a GPU: the decoder compiled with CUDA graphs (reduce-overhead) generates the greedy tokens of the
    model recomputed without a cache, twice (the second run replays the recorded graphs)."""
    config = LlamaConfig(
        vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256, max_seq_len=256
    )
    model = random_llama(7, config).cuda()
    prompt = random_prompt(config, 2, 16, seed=8).cuda()
    expected, smallest_gap = greedy_without_cache(model, prompt, 32)
    # generated code may sum in another order than eager kernels: ask for a wider margin than on the CPU
    assert smallest_gap > 1e-4, f"a near tie ({smallest_gap:.1e}) would make token equality a coin flip"
    decoder = CachedDecoder(model, batch_size=2, max_len=16 + 32 - 1)
    decoder.compile(mode="reduce-overhead", fullgraph=True)
    for _ in range(2):
        assert torch.equal(generate(model, prompt, 32, decoder=decoder), expected)
