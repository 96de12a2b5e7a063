"""Week-9 benchmark: what each quantization method costs in error and buys in decode speed.

    run_quantization_benchmark(Path("benchmarks/results/nvidia-h200"))      # `effdl bench quantization`

Two parts, saved together in inference_quantization.json:

- error: a small Llama trained on the trigram language (common.inference.toy_language) is quantized with
  each method of common.inference.quantization and compared with a float64 copy of itself by
  common.inference.quantization_error: the held-out next-token loss (beside the float64 model's and the
  language's own floor), the relative error of the logits, and each replaced layer's own relative output
  error. The unquantized model in the run's dtype (bf16 on a GPU) is measured the same way, as the
  baseline: its error is bf16's own.
- speed: decode tokens/s at batch 1 of a week-5 Llama preset (random weights: speed does not depend on
  them), each method's model against the unquantized one in the same run, each in a static KV cache
  compiled inside fused_dequantization() and replayed as a CUDA graph (GraphedDecoder; both sides: the same
  compiler settings), timed interleaved by common.bench.compare. Goal: weight-only int8 at least 1.5x the bf16
  tokens/s. A decode step costs the same at every position of a static cache
  (it reads all max_len keys under a mask), so each timed step rolls back to position 0 and decodes one token.
  Every method quantizes every linear layer, the output layer (lm_head) included, as gpt-fast's int8 does:
  at the 8b preset's width it is 262 MB of the 2 GB a bf16 step reads.
  Every quantized model decodes in one layout (QUANTIZED_LAYOUT): q|k|v and gate|up merged into one matmul
  each (fused_projections), because Inductor cannot see into the quantized layers' kernels to merge them
  itself, and attention over the cache written as products and sums (kv_cache.ATTENTION_FORMS), which
  Inductor fuses into reduction kernels instead of repeating the cache for each query group. The bf16
  baseline is timed in each of LAYOUTS and the fastest kept: Inductor already reads gate and up
  in one bf16 kernel (a kernel profile on an H100 shows it), so neither change need help bf16.
  The error part measures the layers unmerged; merging keeps int8's, int4's and fp8-row's codes and
  scales, and changes fp8-tensor's and SmoothQuant's scales only; the attention form changes no weight.

SmoothQuant's W8A8 is fake-quantized (float matmuls around quantize-dequantize): its error is the format's,
its speed is not what an int8 GEMM would give. fp8 needs a GPU with fp8 tensor cores and is recorded as
skipped elsewhere. quick=True runs tiny models on the GPU if there is one, else on the CPU without
compiling: a check that everything runs, saved as inference_quantization_quick.json.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.amp import fp8_supported
from common.bench import Comparison, compare, environment, save_results
from common.hardware import benchmark_device
from common.inference.acceptance import AcceptanceExperiment, held_out_loss, train
from common.inference.fused_projections import fuse_projections
from common.inference.graphed_decoder import GraphedDecoder
from common.inference.kv_cache import CachedDecoder
from common.inference.quantization import METHODS, fused_dequantization, quantize_linears
from common.inference.quantization_error import measure_errors
from common.inference.toy_language import TrigramLanguage
from common.models.llama import Llama, LlamaConfig
from common.tables import format_table

__all__ = ["GOAL_INT8_SPEEDUP", "QuantizationBenchmark", "run_quantization_benchmark"]

GOAL_INT8_SPEEDUP = 1.5  # weight-only int8 decode tokens/s over bf16, batch 1

# How a decode step is laid out: (q|k|v and gate|up merged into one matmul each?, cached attention's form).
# The unquantized model is timed in each, the first the reference; every quantized model in one.
LAYOUTS: dict[str, tuple[bool, str]] = {
    "separate projections, sdpa attention": (False, "sdpa"),
    "merged projections, sdpa attention": (True, "sdpa"),
    "merged projections, attention as reductions": (True, "reductions"),
}
QUANTIZED_LAYOUT = "merged projections, attention as reductions"


@dataclass
class QuantizationBenchmark:
    """Sizes of both parts; the defaults are the GPU run, `quick()` the tiny one."""

    language: TrigramLanguage = field(default_factory=lambda: TrigramLanguage(vocab_size=16, branching=3))
    # The error part's model, trained on the language: widths that int4 groups of group_size divide.
    error_model: LlamaConfig = field(
        default_factory=lambda: LlamaConfig(
            vocab_size=16, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=768, max_seq_len=64
        )
    )
    train_steps: int = 500
    train_batch: int = 32
    train_seq_len: int = 32
    lr: float = 3e-3
    held_out: int = 128  # held-out sequences of train_seq_len tokens for the error metrics
    group_size: int = 128  # int4
    include_output: bool = True  # quantize the output layer (lm_head) too
    alpha: float = 0.5  # SmoothQuant
    # The speed part's model: a common.models.llama preset and the fields changed in it. Llama-3-8B's
    # matrices, because the question is what halving the weight's bytes buys: at the 1b preset's width
    # 2048 (8 layers, this benchmark's model until 2026-12-06) an H100 streamed the bf16 weights at 1.48 TB/s,
    # under half its bandwidth, the step's small kernels between the matmuls weighing as much as the
    # weights. 4 of the 8b preset's 32 layers keep six compiled models short.
    speed_preset: str = "8b"
    speed_changes: dict[str, Any] = field(default_factory=lambda: {"n_layers": 4})
    max_len: int = 512  # positions of the static KV cache
    compile: bool = True  # torch.compile, replayed as CUDA graphs (GraphedDecoder); on a GPU only
    warmup_ms: float = 200.0
    rep_ms: float = 2000.0
    seed: int = 0

    @classmethod
    def quick(cls) -> QuantizationBenchmark:
        """Tiny models, short training and timing: everything runs in seconds on a CPU."""
        return cls(
            error_model=LlamaConfig(
                vocab_size=16, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=48
            ),
            train_steps=200,
            held_out=32,
            group_size=32,
            speed_preset="toy",
            speed_changes={"d_model": 64, "d_ff": 128},
            max_len=64,
            warmup_ms=10.0,
            rep_ms=50.0,
        )

    def speed_model(self) -> LlamaConfig:
        return LlamaConfig.preset(self.speed_preset, **self.speed_changes)


def _skip_reason(method: str, device: torch.device) -> str | None:
    if method.startswith("fp8") and not fp8_supported(device):
        return "fp8 matmuls need an NVIDIA GPU with compute capability >= 8.9 (torch._scaled_mm)"
    return None


def _each_method(
    measure: Callable[[str, nn.Module], dict[str, Any]],
    model: Llama,
    bench: QuantizationBenchmark,
    calibration: torch.Tensor,
    device: torch.device,
) -> dict[str, dict[str, Any]]:
    """{method: measure(method, a quantized copy of model)}, or {"skipped": why} where this device lacks it.
    One copy at a time: each is freed before the next is made."""
    results = {}
    for method in METHODS:
        skipped = _skip_reason(method, device)
        if skipped:
            results[method] = {"skipped": skipped}
            continue
        quantized = _quantized(model, method, bench, calibration)
        results[method] = measure(method, quantized)
        del quantized
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _quantized(
    model: Llama, method: str, bench: QuantizationBenchmark, calibration: torch.Tensor
) -> nn.Module:
    """A quantized copy of model (the original untouched)."""
    return quantize_linears(
        copy.deepcopy(model),
        method,
        group_size=bench.group_size,
        alpha=bench.alpha,
        calibration=[calibration] if method == "smoothquant" else None,
        include_output=bench.include_output,
    )


def error_part(bench: QuantizationBenchmark, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Train the small model, then measure every method's errors against its float64 copy."""
    language, config = bench.language, bench.error_model
    torch.manual_seed(bench.seed)
    model = Llama(config).to(device)
    experiment = AcceptanceExperiment(
        language=language,
        target=config,
        draft=config,
        target_steps=bench.train_steps,
        batch_size=bench.train_batch,
        seq_len=bench.train_seq_len,
        lr=bench.lr,
        seed=bench.seed,
    )
    train(model, language, bench.train_steps, experiment)
    generator = torch.Generator().manual_seed(bench.seed + 2)
    held_out = language.sample(bench.held_out, bench.train_seq_len, generator).to(device)
    calibration = language.sample(16, bench.train_seq_len, generator).to(device)
    reference = copy.deepcopy(model).double()
    base = copy.deepcopy(model).to(dtype)
    results: dict[str, Any] = {
        "language_loss": language.loss(held_out.cpu()),
        "float64_loss": held_out_loss(reference, held_out),
        "baseline": measure_errors(base, reference, held_out),
        "methods": _each_method(
            lambda _, quantized: measure_errors(quantized, reference, held_out),
            base,
            bench,
            calibration,
            device,
        ),
    }
    return results


def _decode_step(decoder: CachedDecoder, token: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One decode step at position 0 of the static cache (every position costs the same)."""

    @torch.no_grad()  # inference, on the eager decoder too (GraphedDecoder runs without autograd itself)
    def step() -> torch.Tensor:
        decoder.rollback(0)
        return decoder.feed(token)

    return step


def _weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (weights, scales, embedding and rotary tables), a tied
    weight once: what quantization shrinks. A decode step reads all but the embedding rows it does not use."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def speed_part(
    bench: QuantizationBenchmark, device: torch.device, dtype: torch.dtype, progress: bool = False
) -> dict[str, Any]:
    """Decode tokens/s at batch 1 of every method against the unquantized model, same run, same cache;
    progress: print each method's speed-up and seconds as it is measured (compiling takes minutes)."""
    config = bench.speed_model()
    torch.manual_seed(bench.seed)
    separate = Llama(config).to(device=device, dtype=dtype).eval()
    merged = fuse_projections(copy.deepcopy(separate))  # q|k|v and gate|up as one matmul each
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    calibration = torch.randint(config.vocab_size, (1, 64), device=device)
    compiled = bench.compile and device.type == "cuda"

    def timed_step(model: nn.Module, attention: str) -> Callable[[], torch.Tensor]:
        if not compiled:
            decoder = CachedDecoder(model, batch_size=1, max_len=bench.max_len, attention=attention)
            return _decode_step(decoder, token)
        # One static shape (1, 1), so that Inductor knows M = 1 and turns the matmuls it compiles (bf16's,
        # int4's dequantizing ones; int8's run common.kernels.int8_matmul) into reductions; it compiles at
        # the first feed, which must run inside fused_dequantization().
        decoder = GraphedDecoder(
            model, batch_size=1, max_len=bench.max_len, dynamic=False, attention=attention
        )
        step = _decode_step(decoder, token)
        # Every decoder compiles the same code (CachedDecoder.forward), one cache entry per decoder: past
        # Dynamo's default limit of 8 entries, the later ones would run uncompiled, with a logged warning.
        limit = 4 * (len(METHODS) + len(LAYOUTS))
        with fused_dequantization(), torch._dynamo.config.patch(recompile_limit=limit):
            step()  # compiles, warms up and captures the step's CUDA graph
        return step

    def compared(
        baseline: Callable[[], object], candidate: Callable[[], object], names: tuple[str, str]
    ) -> Comparison:
        return compare(
            baseline, candidate, names=names, warmup_ms=bench.warmup_ms, rep_ms=bench.rep_ms, device=device
        )

    # The baseline at its best: whichever layout of the unquantized model decodes fastest on this GPU and
    # compiler, each timed against the first; the others' decoders and CUDA graphs are freed.
    name = dtype_name(dtype)
    reference_layout, *candidate_layouts = LAYOUTS
    steps = {
        layout: timed_step(merged if is_merged else separate, attention)
        for layout, (is_merged, attention) in LAYOUTS.items()
    }
    layouts = {
        layout: compared(
            steps[reference_layout], steps[layout], (f"{name} {reference_layout}", f"{name} {layout}")
        )
        for layout in candidate_layouts
    }
    fastest = max(candidate_layouts, key=lambda layout: layouts[layout].speedup)
    baseline_layout = fastest if layouts[fastest].speedup > 1.0 else reference_layout
    baseline_step = steps.pop(baseline_layout)
    del steps
    if progress:
        for layout, comparison in layouts.items():
            print(f"  {name}, {layout}: {comparison.speedup:.2f}x {reference_layout}", flush=True)
        print(f"  the baseline: {name}, {baseline_layout}", flush=True)
    results: dict[str, Any] = {
        "model": {"preset": bench.speed_preset, **asdict(config)},
        "compiled": compiled,
        "baseline_layout": baseline_layout,
        "baseline_layouts": layouts,  # each candidate layout of the unquantized model against the first
        "quantized_layout": QUANTIZED_LAYOUT,
        "baseline_weight_bytes": _weight_bytes(separate),
    }
    quantize_merged, quantized_attention = LAYOUTS[QUANTIZED_LAYOUT]

    def speed(method: str, quantized: nn.Module) -> dict[str, Any]:
        started = time.perf_counter()
        comparison = compared(
            baseline_step,
            timed_step(quantized, quantized_attention),
            (f"{name} decode step", f"{method} decode step"),
        )
        if progress:
            print(
                f"  {method}: {comparison.speedup:.2f}x the {name} tokens/s "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        return {
            "tokens_per_s": 1e3 / comparison.candidate.median_ms,
            "baseline_tokens_per_s": 1e3 / comparison.baseline.median_ms,
            "speedup": comparison.speedup,
            "weight_bytes": _weight_bytes(quantized),
            "comparison": comparison,
        }

    results["methods"] = _each_method(
        speed, merged if quantize_merged else separate, bench, calibration, device
    )
    return results


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _summary(record: dict[str, Any]) -> str:
    """One row per method: loss, logits error, worst layer error, tokens/s and speedup."""
    error, speed = record["error"], record["speed"]
    rows = [
        ("float64 model", f"{error['float64_loss']:.4f}", "-", "-", "-", "-"),
        (
            f"{record['dtype']} (baseline)",
            f"{error['baseline']['loss']:.4f}",
            f"{error['baseline']['logits_relative_error']:.2e}",
            f"{error['baseline']['layer_relative_error']['max']:.2e}",
            "-",
            "-",
        ),
    ]
    skipped: dict[str, list[str]] = {}  # reason -> methods
    for method in METHODS:
        e, s = error["methods"][method], speed["methods"][method]
        if "skipped" in e:
            rows.append((method, "skipped", "-", "-", "-", "-"))
            skipped.setdefault(e["skipped"], []).append(method)
            continue
        rows.append((
            method,
            f"{e['loss']:.4f}",
            f"{e['logits_relative_error']:.2e}",
            f"{e['layer_relative_error']['max']:.2e}",
            f"{s['tokens_per_s']:.0f}",
            f"{s['speedup']:.2f}x",
        ))  # fmt: skip
    header = ["method", "held-out loss", "logits rel. error", "worst layer error", "tokens/s", "vs baseline"]
    notes = [f"skipped {', '.join(methods)}: {reason}" for reason, methods in skipped.items()]
    floor = f"language floor {error['language_loss']:.4f} nats/token"
    return "\n".join([floor, format_table(header, rows), *notes])


def run_quantization_benchmark(out_dir: Path, quick: bool = False) -> list[Path]:
    """Measure every method's error and decode speed on this machine's GPU (or, quick, its CPU); save JSON."""
    device = benchmark_device(quick, "the week-9 quantization benchmark measures decode speed on a GPU")
    # bf16 on a GPU, as it is served; fp32 on a CPU, where bf16 matmuls are slow.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bench = QuantizationBenchmark.quick() if quick else QuantizationBenchmark()
    print(f"running the error part{' (quick)' if quick else ''} ...", flush=True)
    error = error_part(bench, device, dtype)
    print(f"running the speed part{' (quick)' if quick else ''} ...", flush=True)
    speed = speed_part(bench, device, dtype, progress=True)
    int8 = speed["methods"]["int8"]
    record = {
        "benchmark": "inference_quantization",
        "description": "per method: errors against a float64 model on the trigram language, and decode "
        f"tokens/s at batch 1 against the {dtype_name(dtype)} model in the same run",
        "dtype": dtype_name(dtype),
        "config": asdict(bench),
        "goal": {
            "metric": f"int8 decode tokens/s over {dtype_name(dtype)}, batch 1",
            "op": ">=",
            "value": GOAL_INT8_SPEEDUP,
            "met": int8["speedup"] >= GOAL_INT8_SPEEDUP,
        },
        "error": error,
        "speed": speed,
        "quick": quick,
        "environment": environment(device),
    }
    path = save_results(record, Path(out_dir) / f"inference_quantization{'_quick' if quick else ''}.json")
    print(_summary(record))
    return [path]
