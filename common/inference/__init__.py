"""Inference algorithms (week 9): sampling, a static KV cache, speculative decoding, quantization.

One small module per idea, each readable on its own, in this order:

- `sampling`: greedy, temperature, top-k, top-p as distributions (`Sampling.probs`) and a graph-safe draw
  (`sample`);
- `kv_cache`: `CachedDecoder`, the week-5 Llama (common.models.llama, unchanged) beside a cache allocated
  once; `feed` prefills or decodes, `rollback` forgets; compiles to one graph per input shape;
- `graphed_decoder`: `GraphedDecoder`, the same decoder replaying one hand-captured CUDA graph per input
  length (a few microseconds of host time per step), what the benchmarks decode with on a GPU;
- `generate`: `generate(model, prompt, max_new_tokens, sampling)`, prefill then one token per step;
- `speculative`: `speculative_generate(target, draft, prompt, max_new_tokens, draft_len, sampling)`, exact
  under greedy decoding and under sampling (the proof is in `verify`'s docstring), with acceptance counts;
- `toy_language` and `acceptance`: a generated language to train a target and a draft on, and
  `python -m common.inference.acceptance`, which measures the acceptance rate against the formula;
- `quantization`: int8 and int4 weight-only layers, fp8 layers (torch._scaled_mm), SmoothQuant W8A8 by fake
  quantization, and `quantize_linears(model, method)`, which swaps them into a Llama;
  `fused_projections`: `fuse_projections(model)` merges each block's q|k|v and gate|up projections into
  one matmul each (fewer, longer matrix-vector products per decode step);
  `quantization_error`: a quantized model against its float64 original, per layer, in logits and loss;
  `quantization_benchmark`: each method's error and decode speed (`effdl bench quantization`).

    from common.inference.generate import generate
    from common.inference.quantization import quantize_linears
    from common.inference.sampling import Sampling
    from common.inference.speculative import speculative_generate

    tokens = generate(model, prompt, 32, Sampling(temperature=0.8, top_p=0.95), generator=generator)
    tokens, stats = speculative_generate(target, draft, prompt, 32, draft_len=4)   # greedy
    print(stats.acceptance_rate, stats.tokens_per_round)
    tokens = generate(quantize_linears(model, "int8"), prompt, 32)   # int8 weights, in place
"""
