"""Week 9 assignment: int8 inference kernels in Triton, and speculative decoding over a KV cache.

- `fastinfer.quantize`: a Triton kernel that quantizes rows to int8 with one absmax scale per row.
- `fastinfer.w8a8`: a W8A8 GEMM in Triton: int8 activations and weights, int32 accumulation, a dequantizing
  epilogue.
- `fastinfer.speculative`: greedy speculative decoding that drives two `fastinfer.decoder.Decoder`s.
- `fastinfer.decoder` (given, not submitted): a model beside its KV cache, one sequence at a time.

Import the modules themselves (`from fastinfer.w8a8 import w8a8_matmul`): this file imports nothing, so a
mistake in one module cannot break the others.
"""
