"""common.inference.quantization: each format's error bound, int4 packing, SmoothQuant's invariance and its
benefit on outlier channels, quantized Llamas that still generate, the benchmark's quick run, bad inputs.

The bounds come from the formats: rounding to a grid of step `scale` moves a value by at most scale / 2.
The CUDA paths (int8 and fp8 matmuls on a GPU, compiled decoding) are `gpu` tests.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from inference_toys import CONFIG, greedy_without_cache, random_llama, random_prompt
from torch import nn

from common import amp
from common.amp import Fp8UnsupportedError
from common.hardware import NoGPUError
from common.inference import quantization as q
from common.inference.fused_projections import fuse_projections
from common.inference.generate import generate
from common.inference.graphed_decoder import GraphedDecoder
from common.inference.kv_cache import CachedDecoder
from common.inference.quantization_benchmark import LAYOUTS, QUANTIZED_LAYOUT, run_quantization_benchmark
from common.inference.quantization_error import measure_errors
from common.models.llama import LlamaConfig

# fp32 arithmetic in the quantizers: x / scale (at most 127 in magnitude) and q * scale are each rounded to
# 24 significant bits, so each moves the restored value by at most 127 * 2^-24 < 1e-5 of a step.
FP32_SLACK = 2e-5


def seeded(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------
# int8 and int4 round trips
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [-1, 0])
def test_int8_round_trip_is_within_half_a_step_of_absmax_over_127(dim: int) -> None:
    x = seeded(24, 100) * torch.logspace(-3, 3, 100)  # slices of very different ranges
    x[5] = 0.0  # an all-zero row: restored exactly whatever its scale
    qx, scale = q.quantize_int8(x, dim)
    assert qx.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale.shape == x.abs().amax(dim, keepdim=True).shape
    # The scale is the slice's absmax over 127 (computed here in float64), so the bound below is tight.
    absmax = x.double().abs().amax(dim, keepdim=True)
    expected = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    torch.testing.assert_close(scale.double(), expected, rtol=1e-6, atol=0)
    restored = q.dequantize_int8(qx, scale)
    assert ((restored - x).abs() <= scale * (0.5 + FP32_SLACK)).all()
    # The whole symmetric range is used (each nonzero slice reaches +-127) and -128 never appears.
    assert torch.equal(qx.abs().amax(dim), torch.where(absmax.squeeze(dim) > 0, 127, 0).to(torch.int8))
    assert qx.min().item() >= -127
    assert not restored[5].any()  # zeros round to code 0 under any scale


def test_int4_packing_round_trips_exactly_low_nibble_first() -> None:
    codes = torch.randint(0, 16, (5, 3, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = q.pack_int4(codes)
    assert packed.shape == (5, 3, 6) and packed.dtype == torch.uint8
    assert torch.equal(packed.int(), codes[..., 0::2].int() + 16 * codes[..., 1::2].int())
    assert torch.equal(q.unpack_int4(packed), codes)
    every_byte = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(q.pack_int4(q.unpack_int4(every_byte)), every_byte)


def test_int4_round_trip_is_within_half_a_step_of_each_group() -> None:
    group = 64
    w = seeded(8, 256) + torch.linspace(-5, 5, 256 // group).repeat_interleave(group)  # groups off-centre
    w[3, :group] = 0.25  # a constant group: restored exactly
    packed, scale, minimum = q.quantize_int4(w, group)
    assert packed.shape == (8, 128) and scale.shape == minimum.shape == (8, 256 // group)
    groups = w.double().reshape(8, -1, group)
    spread = groups.amax(-1) - groups.amin(-1)
    # Asymmetric: 15 steps from the group's minimum to its maximum (float64 reference).
    torch.testing.assert_close(minimum.double(), groups.amin(-1), rtol=0, atol=0)
    expected = torch.where(spread > 0, spread / 15, torch.ones_like(spread))
    torch.testing.assert_close(scale.double(), expected, rtol=1e-6, atol=0)
    restored = q.dequantize_int4(packed, scale, minimum)
    step = scale.repeat_interleave(group, dim=1)
    assert ((restored - w).abs() <= step * (0.5 + FP32_SLACK)).all()
    assert torch.equal(restored[3, :group], w[3, :group])
    codes = q.unpack_int4(packed).reshape(8, -1, group)
    assert (codes.amin(-1)[spread > 0] == 0).all() and (codes.amax(-1)[spread > 0] == 15).all()


# ----------------------------------------------------------------------------------------------------
# The nn.Linear replacements against float references
# ----------------------------------------------------------------------------------------------------


def test_int8_linear_matches_the_dequantized_weights_and_stays_within_the_format_bound() -> None:
    torch.manual_seed(0)  # the layer's initial weights
    linear = nn.Linear(64, 48, bias=True)
    x = seeded(3, 5, 64, seed=1)
    layer = q.Int8WeightLinear(linear)
    assert layer.weight.dtype == torch.int8 and layer.scale.shape == (48,)
    y = layer(x)
    assert y.shape == (3, 5, 48) and y.dtype == x.dtype
    # Against the float64 product with the dequantized weights: fp32 sums of 64 terms round at ~1e-6.
    dequantized = layer.weight.double() * layer.scale.double()[:, None]
    exact = x.double() @ dequantized.T + linear.bias.double()
    torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5)
    # Against the float layer: each weight moved by at most scale_row / 2, so an output by at most
    # scale_row / 2 * sum_j |x_j| (the triangle inequality), plus the fp32 rounding above.
    bound = layer.scale.double() / 2 * x.double().abs().sum(-1, keepdim=True)
    assert ((y.double() - linear(x).double()).abs() <= bound * (1 + 1e-4) + 1e-5).all()


def test_int4_linear_stays_within_the_grouped_bound() -> None:
    torch.manual_seed(0)  # the layer's initial weights
    linear = nn.Linear(128, 32, bias=False)
    layer = q.Int4WeightLinear(linear, group_size=32)
    x = seeded(7, 128, seed=2)
    y = layer(x)
    step = layer.scale.double().repeat_interleave(32, dim=1)  # (out, in): each weight's group step
    bound = x.double().abs() @ (step / 2).T  # sum_j |x_j| step_j / 2 for each output
    assert ((y.double() - linear(x).double()).abs() <= bound * (1 + 1e-4) + 1e-5).all()
    assert layer.weight.numel() == 128 * 32 // 2, "two int4 codes per byte"


def test_smoothquant_migration_keeps_the_float_product() -> None:
    x = seeded(16, 64, seed=3).double() * torch.logspace(-2, 2, 64, dtype=torch.float64)
    w = seeded(32, 64, seed=4).double()
    for alpha in (0.0, 0.5, 0.8, 1.0):
        s = q.smoothing_factors(x.abs().amax(0), w, alpha).double()
        # (X diag(s)^-1)(diag(s) W^T) = X W^T: exact up to float64 rounding of the products (~1e-16).
        torch.testing.assert_close((x / s) @ (w * s).T, x @ w.T, rtol=1e-12, atol=1e-12)
        expected = x.abs().amax(0).pow(alpha) / w.abs().amax(0).pow(1 - alpha)
        torch.testing.assert_close(s, expected, rtol=1e-6, atol=0)


def test_smoothquant_cuts_the_w8a8_error_on_activations_with_outlier_channels() -> None:
    # 4 of 512 input channels 100x larger than the rest, as in LLM activations (the SmoothQuant paper).
    x = seeded(256, 512, seed=5)
    x[:, :4] *= 100
    linear = nn.Linear(512, 256, bias=False)
    with torch.no_grad():
        linear.weight.copy_(seeded(256, 512, seed=6))
    exact = x.double() @ linear.weight.double().T

    def error(y: torch.Tensor) -> float:
        return ((y.double() - exact).norm() / exact.norm()).item()

    plain = error(q.fake_quantize_int8(x) @ q.fake_quantize_int8(linear.weight.detach()).T)
    layer = q.SmoothQuantLinear(linear, x.abs().amax(0), alpha=0.5)
    smoothed = error(layer(x))
    # The layer is fq(X / s) fq(W diag(s))^T: the product of the two fake-quantized factors.
    s = layer.smooth
    manual = q.fake_quantize_int8(x / s) @ q.fake_quantize_int8(linear.weight.detach() * s).T
    torch.testing.assert_close(layer(x), manual, rtol=1e-5, atol=1e-4)
    # Without smoothing, each token's int8 step is set by its outliers (the largest of 4 values of std 100,
    # over 127: about 1.2 here), so the 508 ordinary channels (std 1) keep a few levels each. With
    # alpha = 0.5, s is about sqrt(100 * 3 / 3) = 10 on the outlier channels (|x| up to ~300, |w| up to ~3)
    # and about 1 elsewhere: the token's step shrinks about 10x, while a weight row's step grows only where
    # an outlier column now sets its max. At this seed the error drops from 4.0% to 0.7%; requiring 3x
    # leaves room for other seeds, and a smoothing that did nothing (s = 1) would fail it.
    assert smoothed < plain / 3, (plain, smoothed)


def test_fp8_linear_quantizes_weights_per_tensor_and_per_row_on_any_machine() -> None:
    torch.manual_seed(0)  # the layer's initial weights
    linear = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        linear.weight[7] *= 1e5  # an outlier row: with its scale, the others fall to e4m3's subnormals
    fmax = torch.finfo(amp.E4M3).max
    per_tensor, per_row = q.Fp8Linear(linear, "tensor"), q.Fp8Linear(linear, "row")
    w = linear.weight.detach()
    assert per_tensor.scale.shape == () and per_row.scale.shape == (1, 32)
    torch.testing.assert_close(per_tensor.scale, w.abs().amax() / fmax)
    torch.testing.assert_close(per_row.scale[0], w.abs().amax(1) / fmax)
    # The float emulation of each layer's weights: with one scale for all rows, the outlier row pushes
    # the others towards e4m3's subnormals; with one per row it costs only itself.
    errors = {}
    for name, layer in (("tensor", per_tensor), ("row", per_row)):
        restored = layer.weight.float() * (layer.scale if name == "tensor" else layer.scale.t())
        others = torch.arange(32) != 7
        errors[name] = ((restored - w)[others].norm() / w[others].norm()).item()
    # Per row: each row's values fill e4m3's normal range, each rounded to 3 mantissa bits (relative error
    # at most eps/2 = 6.25%, less on average): the norm's relative error is below eps/2. Per tensor, the
    # other rows sit 1e5 below the scale's top, among the subnormals: at this seed 20% against 2.5%.
    assert errors["row"] < torch.finfo(amp.E4M3).eps / 2
    assert errors["tensor"] > 4 * errors["row"], errors
    with pytest.raises(Fp8UnsupportedError, match="compute capability"):
        per_row(seeded(2, 64).bfloat16())  # the GEMM itself needs an fp8 GPU


# ----------------------------------------------------------------------------------------------------
# Quantized Llamas
# ----------------------------------------------------------------------------------------------------


def test_quantize_linears_swaps_the_projections_but_not_the_output_or_the_embedding() -> None:
    model = random_llama(0)
    q.quantize_linears(model, "int8")
    swapped = {n for n, m in model.named_modules() if isinstance(m, q.Int8WeightLinear)}
    per_layer = {"attention.wq", "attention.wk", "attention.wv", "attention.wo"} | {
        f"feed_forward.w{i}" for i in (1, 2, 3)
    }
    assert swapped == {f"layers.{i}.{p}" for i in range(CONFIG.n_layers) for p in per_layer}
    assert type(model.output) is nn.Linear and type(model.tok_embeddings) is nn.Embedding
    model = q.quantize_linears(random_llama(0), "int4", group_size=32, include_output=True)
    assert isinstance(model.output, q.Int4WeightLinear)


@pytest.mark.parametrize("method", ["int8", "int4", "smoothquant"])
def test_a_quantized_llama_generates_the_same_with_and_without_the_kv_cache(method: str) -> None:
    prompt = random_prompt(CONFIG, 2, 5)
    model = q.quantize_linears(
        random_llama(1),
        method,
        group_size=32,
        calibration=[random_prompt(CONFIG, 4, 16, seed=1)] if method == "smoothquant" else None,
    )
    tokens = generate(model, prompt, 12)
    expected, gap = greedy_without_cache(model, prompt, 12)
    # Token ids are comparable when the best logit leads the second by far more than the ~1e-6 rounding
    # differences between the cached and uncached computations (see inference_toys).
    assert gap > 1e-4
    assert torch.equal(tokens, expected)


def test_fused_dequantization_sets_inductors_batch_1_matmul_rewrite_only_inside() -> None:
    import torch._inductor.config as inductor_config

    before = inductor_config.coordinate_descent_tuning
    with q.fused_dequantization():
        assert (
            inductor_config.coordinate_descent_tuning is True
        )  # what turns a (1, K) @ (K, N) into a reduction
    assert inductor_config.coordinate_descent_tuning == before


@pytest.mark.parametrize("merged", [False, True], ids=["separate", "merged"])  # fuse_projections or not
def test_an_int8_decode_step_compiles_without_graph_breaks(merged: bool) -> None:
    """fullgraph=True fails on any graph break: the int8 layers (and the merged layers' split) trace into
    the decoder's one graph per shape (so CUDA graphs can capture them). The counting backend runs the
    captured graph eagerly (no code generation on a CPU)."""
    graphs = []

    def counting_backend(graph_module: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph_module)
        return graph_module.forward

    prompt = random_prompt(CONFIG, 1, 5, seed=2)
    model = random_llama(3)
    model = q.quantize_linears(fuse_projections(model) if merged else model, "int8")
    expected = generate(model, prompt, 6)
    torch._dynamo.reset()
    decoder = CachedDecoder(model, batch_size=1, max_len=10)
    decoder.compile(backend=counting_backend, fullgraph=True, dynamic=False)
    assert torch.equal(generate(model, prompt, 6, decoder=decoder), expected)
    assert len(graphs) == 2, f"one graph for the prefill and one for the decode steps, got {len(graphs)}"
    torch._dynamo.reset()


def test_measure_errors_finds_a_known_error_in_the_layer_that_has_it() -> None:
    reference = random_llama(4).double()
    model = copy.deepcopy(reference).float()
    with torch.no_grad():
        model.layers[1].feed_forward.w3.weight.mul_(1.01)  # this layer's outputs 1% too large
    errors = measure_errors(model, reference, random_prompt(CONFIG, 2, 12, seed=4))
    layers = errors["layer_relative_error"]["per_layer"]
    assert len(layers) == 7 * CONFIG.n_layers + 1 and "output" in layers  # the output layer too
    # Each layer gets the float64 model's input (in fp32): the scaled layer is off by 1% whatever the
    # layers before it do, the others by fp32 rounding only (~1e-7).
    assert layers["layers.1.feed_forward.w3"] == pytest.approx(0.01, rel=1e-4)
    assert max(e for name, e in layers.items() if name != "layers.1.feed_forward.w3") < 1e-5
    assert errors["layer_relative_error"]["max"] == layers["layers.1.feed_forward.w3"]
    assert errors["logits_relative_error"] > 1e-4
    with pytest.raises(TypeError, match="float64 model"):
        measure_errors(model, model, random_prompt(CONFIG, 2, 12))


# ----------------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------------


def test_bad_inputs_get_errors_that_name_the_problem() -> None:
    with pytest.raises(TypeError, match="float tensor.*torch.int64"):
        q.quantize_int8(torch.arange(8))
    with pytest.raises(TypeError, match="q must be int8, got torch.float32"):
        q.dequantize_int8(torch.zeros(4), torch.ones(1))
    with pytest.raises(ValueError, match=r"group_size=128 must be even and divide in_features=96.*32"):
        q.quantize_int4(seeded(4, 96), 128)
    with pytest.raises(ValueError, match="group_size=3 must be even"):
        q.quantize_int4(seeded(4, 96), 3)
    with pytest.raises(ValueError, match="must be a matrix"):
        q.quantize_int4(seeded(96), 32)
    with pytest.raises(ValueError, match="must be in 0..15, got a maximum of 16"):
        q.pack_int4(torch.tensor([1, 16], dtype=torch.uint8))
    with pytest.raises(ValueError, match="last dimension must be even, got 3"):
        q.pack_int4(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="must be uint8"):
        q.pack_int4(torch.zeros(4, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"expected \(64,\)"):
        q.smoothing_factors(torch.ones(32), seeded(8, 64))
    with pytest.raises(ValueError, match="alpha must be in"):
        q.smoothing_factors(torch.ones(64), seeded(8, 64), alpha=1.5)
    with pytest.raises(ValueError, match="granularity must be 'tensor' or 'row'"):
        q.Fp8Linear(nn.Linear(32, 16), "channel")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="x has 16 features.*takes 32"):
        q.Int8WeightLinear(nn.Linear(32, 16))(torch.randn(2, 16))
    model = random_llama(0)
    with pytest.raises(ValueError, match="unknown quantization method 'int3'.*int8, int4"):
        q.quantize_linears(model, "int3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="smoothquant needs calibration"):
        q.quantize_linears(model, "smoothquant")
    with pytest.raises(ValueError, match="used by smoothquant only"):
        q.quantize_linears(model, "int8", calibration=[random_prompt(CONFIG, 1, 4)])
    with pytest.raises(ValueError, match="no calibration batch"):
        q.quantize_linears(model, "smoothquant", calibration=[])
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        q.quantize_linears(nn.Sequential(nn.ReLU()), "int8")
    # d_ff = 96: groups of 64 fit the attention's inputs (64 wide) but not w2's, the last layer of a block.
    model = random_llama(0, LlamaConfig(vocab_size=32, d_model=64, n_heads=4, n_kv_heads=2, d_ff=96))
    with pytest.raises(ValueError, match="group_size=64 must be even and divide in_features=96"):
        q.quantize_linears(model, "int4", group_size=64)
    assert all(type(m) is nn.Linear for name, m in model.named_modules() if name.endswith(("wq", "w2"))), (
        "a refused call leaves every layer as it was"
    )


# ----------------------------------------------------------------------------------------------------
# The benchmark, quick, on the CPU
# ----------------------------------------------------------------------------------------------------

# Largest change of the held-out loss (nats/token) each method may cause in the quick benchmark's model,
# trained on the trigram language. Measured on this model: int8 within 0.0001, int4 (groups of 32) +0.003,
# SmoothQuant W8A8 within 0.001. Each bound is several times that and far below the ~1.5 nats between
# this model and a uniform guess (log 16 = 2.77), so a quantizer that wrecks the weights cannot pass.
LOSS_BOUNDS = {"int8": 0.005, "int4": 0.05, "smoothquant": 0.01}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if torch.cuda.is_available():
        pytest.skip("checks the CPU path; on a GPU `effdl bench quantization` runs the real sizes")
    (path,) = run_quantization_benchmark(tmp_path_factory.mktemp("quantization"), quick=True)
    assert path.name == "inference_quantization_quick.json"
    return json.loads(Path(path).read_text())


def test_the_quick_benchmark_records_every_method_or_why_it_was_skipped(saved: dict) -> None:
    assert saved["quick"] is True and saved["environment"]["device"] == "cpu"
    for part in ("error", "speed"):
        assert set(saved[part]["methods"]) == set(q.METHODS)
        for method in ("fp8-tensor", "fp8-row"):
            assert "compute capability >= 8.9" in saved[part]["methods"][method]["skipped"]
    error = saved["error"]
    assert error["float64_loss"] < math.log(16) - 1.0, f"the model did not learn the language: {error}"
    # The fp32 baseline differs from the float64 model by fp32 rounding only.
    assert error["baseline"]["logits_relative_error"] < 1e-5
    for method in ("int8", "int4", "smoothquant"):
        e = error["methods"][method]
        assert e["layer_relative_error"]["max"] == max(e["layer_relative_error"]["per_layer"].values())
        per_layer = e["layer_relative_error"]["per_layer"]
        assert len(per_layer) == 7 * saved["config"]["error_model"]["n_layers"] + 1 and "output" in per_layer
        assert abs(e["loss"] - error["float64_loss"]) <= LOSS_BOUNDS[method], (method, e["loss"])
    # Fewer bits, more error: int4 (4 bits per weight) against int8 (8 bits), on every layer.
    layers = error["methods"]["int8"]["layer_relative_error"]["per_layer"]
    for name, int4_error in error["methods"]["int4"]["layer_relative_error"]["per_layer"].items():
        assert int4_error > layers[name]


def test_the_quick_benchmark_reports_tokens_per_second_against_the_same_run(saved: dict) -> None:
    speed = saved["speed"]
    baseline_bytes = speed["baseline_weight_bytes"]
    for method in ("int8", "int4", "smoothquant"):
        s = speed["methods"][method]
        comparison = s["comparison"]
        assert s["tokens_per_s"] == pytest.approx(1e3 / comparison["candidate"]["median_ms"])
        assert s["baseline_tokens_per_s"] == pytest.approx(1e3 / comparison["baseline"]["median_ms"])
        assert s["speedup"] == comparison["speedup"]
    # Bytes a decode step reads: the fp32 projections become 1 byte (int8) or half a byte (int4) per weight.
    assert (
        speed["methods"]["int4"]["weight_bytes"] < speed["methods"]["int8"]["weight_bytes"] < baseline_bytes
    )
    assert saved["goal"]["met"] == (speed["methods"]["int8"]["speedup"] >= saved["goal"]["value"])
    # The baseline is the fastest of its layouts, each timed against the first; every quantized copy
    # decodes in one layout.
    reference, *candidates = LAYOUTS
    layouts = speed["baseline_layouts"]
    assert list(layouts) == candidates
    speedups = {reference: 1.0, **{layout: layouts[layout]["speedup"] for layout in candidates}}
    assert speed["baseline_layout"] == max(speedups, key=speedups.get)
    assert speed["quantized_layout"] == QUANTIZED_LAYOUT


def test_the_full_benchmark_needs_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without a GPU")
    with pytest.raises(NoGPUError, match="--quick"):
        run_quantization_benchmark(Path("unused"), quick=False)


# ----------------------------------------------------------------------------------------------------
# CUDA paths
# ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_int8_linear_compiled_at_batch_1_reads_int8_weights_on_cuda() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    n, k = 4096, 4096
    layer = q.Int8WeightLinear(nn.Linear(k, n, bias=False).to(device=device, dtype=torch.bfloat16))
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
    exact = x.double() @ (layer.weight.double() * layer.scale.double()[:, None]).T
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    with q.fused_dequantization():
        compiled(x)  # compiles here, inside the setting
    # bf16 output and scales (relative 2^-9 each) and fp32 sums: 1% of the norm leaves a wide margin; a
    # wrong scale or layout is off by ~100%.
    for fn in (layer, compiled):
        y = fn(x)
        assert y.dtype == torch.bfloat16 and y.shape == (1, n)
        assert ((y.double() - exact).norm() / exact.norm()).item() < 1e-2
    # What makes it fast: the compiled step never holds a dequantized copy of the weights (n k bf16 = 32 MiB,
    # which the eager layer allocates), only x, y and the kernel's partial sums.
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    compiled(x)
    torch.cuda.synchronize(device)
    assert torch.cuda.max_memory_allocated(device) - before < n * k // 4
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("tokens", [1, 37])
def test_fp8_linear_on_cuda_matches_its_float_emulation(granularity: str, tokens: int) -> None:
    if not amp.fp8_supported():
        pytest.skip("fp8 tensor cores need compute capability >= 8.9")
    device = torch.device("cuda", torch.cuda.current_device())
    linear = nn.Linear(512, 256, bias=False).to(device=device, dtype=torch.bfloat16)
    layer = q.Fp8Linear(linear, granularity)  # type: ignore[arg-type]
    x = torch.randn(tokens, 512, device=device, dtype=torch.bfloat16)
    x8, x_scale = amp.to_fp8(x, dim=-1 if granularity == "row" else None)
    w_scale = layer.scale if granularity == "tensor" else layer.scale.t()
    emulated = (x8.double() * x_scale.double()) @ (layer.weight.double() * w_scale.double()).T
    y = layer(x)
    # The product of the fp8 operands, up to bf16 output rounding (2^-9) and the tensor cores' accumulation.
    assert ((y.double() - emulated).norm() / emulated.norm()).item() < 1e-2
    # And the float layer within fp8's error: two e4m3 operands at ~eps/sqrt(12) rms each (see test_amp).
    reference = x.double() @ linear.weight.double().T
    bound = 1.5 * math.hypot(torch.finfo(amp.E4M3).eps, torch.finfo(amp.E4M3).eps) / math.sqrt(12)
    assert ((y.double() - reference).norm() / reference.norm()).item() < bound


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["int8", "int4", "fp8-row"])
def test_a_quantized_llama_decodes_the_same_compiled_with_cuda_graphs(method: str) -> None:
    if method.startswith("fp8") and not amp.fp8_supported():
        pytest.skip("fp8 tensor cores need compute capability >= 8.9")
    device = torch.device("cuda", torch.cuda.current_device())
    config = LlamaConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256)
    model = q.quantize_linears(random_llama(2, config).to(device=device, dtype=torch.bfloat16), method)
    prompt = random_prompt(config, 1, 8, seed=3).to(device)
    torch._dynamo.reset()
    eager, compiled = (
        CachedDecoder(model, 1, 16),
        GraphedDecoder(model, 1, 16, dynamic=False),
    )  # as the benchmark
    token = prompt[:, -1:]
    # Generated code sums and rounds in another order than the eager kernels, in bf16 (2^-9 relative per
    # rounding, a few dozen roundings deep): 2% of the norm. fp8 also rounds the activations to e4m3, 3
    # mantissa bits: a value that the two orders leave on either side of a rounding boundary lands on
    # neighbouring codes, 2^-3 apart, so the two sides may differ by up to the size of fp8's own error,
    # 2^-4 (6%) of the norm; an H100 measured 3.4% at the prefill.
    bound = 2**-4 if method.startswith("fp8") else 2e-2
    # Inference, as the benchmark runs it: with autograd on, the compiled graph would also need a backward
    # (which torch._scaled_mm, fp8's matmul, does not have).
    with q.fused_dequantization(), torch.no_grad():
        for step in range(4):  # the prefill, then decode steps: the later ones replay the captured graph
            tokens = prompt if step == 0 else token
            expected = eager.feed(tokens).double()
            got = compiled.feed(tokens).double()
            assert ((got - expected).norm() / expected.norm()).item() < bound, step
    assert generate(model, prompt, 8, decoder=compiled).shape == (1, 16)
    torch._dynamo.reset()
