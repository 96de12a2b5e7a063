"""common.inference.fused_projections: merged q|k|v and gate|up layers compute what the separate ones did.

References: the unmerged model itself. In float64 a merged matmul sums each output channel's products in
its own dot product, as the separate layers do, so only the summation order inside a matmul kernel can
differ: 1e-12 of the largest logit is far above that (~1e-15) and far below what a swapped or misplaced
slice does (logits move by O(1)).
"""

from __future__ import annotations

import copy

import pytest
import torch
from inference_toys import CONFIG, random_llama, random_prompt
from torch import nn

from common.inference import quantization as q
from common.inference.fused_projections import FusedFeedForward, FusedQKV, fuse_projections, is_fused
from common.inference.generate import generate
from common.inference.graphed_decoder import GraphedDecoder
from common.inference.kv_cache import CachedDecoder
from common.models.llama import LlamaConfig


def assert_logits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12 * expected.abs().max().item())


@torch.no_grad()
def decode_logits(model: nn.Module, prompt: torch.Tensor, steps: list[torch.Tensor]) -> list[torch.Tensor]:
    """The logits of a prefill and of each later feed, through a CachedDecoder."""
    decoder = CachedDecoder(model, batch_size=prompt.shape[0], max_len=prompt.shape[1] + len(steps))
    return [decoder.feed(tokens) for tokens in (prompt, *steps)]


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])  # q, k, v of equal widths, grouped-query, multi-query
def test_merged_layers_decode_and_forward_as_the_separate_ones(n_kv_heads: int) -> None:
    config = LlamaConfig(**{**CONFIG.__dict__, "n_kv_heads": n_kv_heads})
    model = random_llama(0, config).double()
    fused = fuse_projections(copy.deepcopy(model))
    assert all(is_fused(block.attention) for block in fused.layers)
    assert all(isinstance(block.feed_forward, FusedFeedForward) for block in fused.layers)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in model.parameters())
    prompt = random_prompt(config, batch=2, length=6, seed=1)
    steps = [random_prompt(config, batch=2, length=1, seed=2 + i) for i in range(3)]
    for got, expected in zip(
        decode_logits(fused, prompt, steps), decode_logits(model, prompt, steps), strict=True
    ):
        assert_logits_equal(got, expected)
    with torch.no_grad():  # Llama.forward still runs: wq, wk, wv each keep their part of the merged product
        assert_logits_equal(fused(prompt), model(prompt))


def test_the_decoder_runs_the_merged_qkv_matmul_once_per_layer() -> None:
    model = fuse_projections(random_llama(0))
    calls = []
    for block in model.layers:
        block.attention.wqkv.register_forward_hook(lambda *_: calls.append(1))
    decode_logits(model, random_prompt(CONFIG, batch=1, length=4), [])
    assert len(calls) == CONFIG.n_layers


@pytest.mark.parametrize("method", ["int8", "int4"])  # fp8's matmul takes bf16 only: no float64 reference
def test_per_row_quantization_of_merged_layers_equals_the_separate_layers(method: str) -> None:
    """Per-output-channel scales (int8's per row, int4's per group of a row) do not see the other rows of a
    merged weight: the same codes and scales, so the same logits (float64: the layers keep the model's
    dtype)."""
    model = random_llama(1).double()
    separate = q.quantize_linears(copy.deepcopy(model), method, group_size=32)
    merged = q.quantize_linears(fuse_projections(copy.deepcopy(model)), method, group_size=32)
    replaced = {name for name, module in merged.named_modules() if isinstance(module, q.QuantizedLinear)}
    per_layer = {"attention.wqkv.linear", "attention.wo", "feed_forward.w13", "feed_forward.w2"}
    assert replaced == {f"layers.{i}.{p}" for i in range(CONFIG.n_layers) for p in per_layer}
    prompt = random_prompt(CONFIG, batch=2, length=5, seed=3)
    steps = [random_prompt(CONFIG, batch=2, length=1, seed=4)]
    for got, expected in zip(
        decode_logits(merged, prompt, steps), decode_logits(separate, prompt, steps), strict=True
    ):
        assert_logits_equal(got, expected)


def test_smoothquant_calibrates_a_merged_model_and_generates() -> None:
    model = fuse_projections(random_llama(1))
    calibration = [random_prompt(CONFIG, 4, 16, seed=1)]
    quantized = q.quantize_linears(model, "smoothquant", calibration=calibration)
    assert isinstance(quantized.layers[0].attention.wqkv.linear, q.SmoothQuantLinear)
    assert generate(quantized, random_prompt(CONFIG, 1, 4), 5).shape == (1, 9)


def test_bad_uses_get_errors_that_name_the_problem() -> None:
    with pytest.raises(TypeError, match="takes a common.models.llama.Llama"):
        fuse_projections(nn.Linear(4, 4))
    model = fuse_projections(random_llama(0))
    with pytest.raises(ValueError, match="merged already"):
        fuse_projections(model)
    with pytest.raises(TypeError, match="before quantize_linears"):
        fuse_projections(q.quantize_linears(random_llama(0), "int8"))
    with pytest.raises(ValueError, match="bias-free"):
        FusedQKV(nn.Linear(4, 4), nn.Linear(4, 2, bias=False), nn.Linear(4, 2, bias=False))


@pytest.mark.gpu
def test_merged_int8_layers_decode_as_the_separate_ones_in_cuda_graphs() -> None:
    """bf16 on the GPU, int8 kernel path (one row), CUDA graphs: the merged and separate models differ only
    in how the kernel tiles a longer weight and where bf16 rounds, so the bound of the week's other graph
    test applies (2% of the norm, a few dozen bf16 roundings deep)."""
    device = torch.device("cuda", torch.cuda.current_device())
    config = LlamaConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256)
    model = random_llama(2, config).to(device=device, dtype=torch.bfloat16)
    separate = q.quantize_linears(copy.deepcopy(model), "int8")
    merged = q.quantize_linears(fuse_projections(copy.deepcopy(model)), "int8")
    prompt = random_prompt(config, 1, 8, seed=3).to(device)
    torch._dynamo.reset()
    expected_decoder, decoder = CachedDecoder(separate, 1, 16), GraphedDecoder(merged, 1, 16, dynamic=False)
    with q.fused_dequantization(), torch.no_grad():
        for step in range(4):  # the prefill, then decode steps that replay the captured graph
            tokens = prompt if step == 0 else prompt[:, -1:]
            expected = expected_decoder.feed(tokens).double()
            got = decoder.feed(tokens).double()
            assert ((got - expected).norm() / expected.norm()).item() < 2e-2, step
    torch._dynamo.reset()
