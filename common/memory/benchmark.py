"""Week-5 benchmarks: the memory predictor, checkpointing, offloading and the Triton path, on this GPU.

    run_large_model_benchmarks(Path("benchmarks/results"))      # `effdl bench large-models`

Four measurements, each saved as JSON with its goal and the environment:

- memory: predict_step_memory against torch.cuda.max_memory_allocated for one AdamW step (fp32 weights,
  bf16 autocast) of the 125M, 350M and 1B models at 8 x 2048 tokens. Goal: each within 10%.
- checkpointing: a forward and backward of the 1B model in bf16 at 8 x 2048 tokens with no, selective and
  full checkpointing (measure_checkpointing). Goals: full adds at most 35% to the step time, selective 15%.
- offload: a forward and backward of the 1B model in bf16 at 16 x 2048 tokens, on the GPU, offloaded, and
  offloaded with prefetch (measure_offload). Goal: prefetch keeps at least 70% of the plain throughput.
  The batch is large on purpose: each block's compute grows with the tokens, its copies do not.
- kernels: a forward and backward of the 350M and 1B models in bf16 through PyTorch's ops and through the
  course's Triton kernels (use_kernels=True), from the same weights, timed interleaved with compare. Goal:
  the Triton path at least 1.0x, at the same loss (within bf16 rounding).

quick=True runs the toy model at small sizes, on the GPU if there is one, else on the CPU (where the peak
memory comes from the profiler and the kernels are skipped): a check that everything runs, saved with
_quick in the file names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common.bench import compare, environment, save_results
from common.hardware import benchmark_device
from common.memory.anatomy import measure_step_memory, predict_step_memory
from common.memory.checkpointing import measure_checkpointing
from common.memory.offload import measure_offload
from common.models.llama import Llama, LlamaConfig, random_batch
from common.tables import format_table

__all__ = ["GOALS", "run_large_model_benchmarks"]

GB = 1e9
GOALS = {
    "memory": 0.10,  # largest |measured / predicted - 1|
    "checkpointing full": 0.35,  # largest extra step time
    "checkpointing selective": 0.15,
    "offload": 0.70,  # smallest share of the plain throughput kept with prefetch
    "kernels": 1.0,  # smallest speedup of the Triton path
}
# Same weights, same batch: the two paths differ only in the order of their roundings. A bf16 matmul rounds
# each output to 8 significant bits (relative 2^-9); the loss averages thousands of tokens in fp32, so those
# roundings mostly cancel. 1% bounds a real difference (a wrong kernel changes the loss by far more).
LOSS_RTOL = 1e-2


def _sizes(quick: bool) -> dict[str, Any]:
    """Models and token counts of each part: the issue's sizes, or the toy at small ones."""
    if quick:
        toy = LlamaConfig.preset("toy")
        return {
            "memory": [("toy", toy, 2, 64), ("toy-4-layers", LlamaConfig.preset("toy", n_layers=4), 2, 64)],
            "checkpointing": ("toy", toy, 2, 64),
            "offload": ("toy", toy, 2, 64),
            "kernels": [("toy", LlamaConfig.preset("toy", d_model=256, n_heads=4, n_kv_heads=2), 2, 128)],
        }
    presets = {name: LlamaConfig.preset(name) for name in ("125m", "350m", "1b")}
    return {
        "memory": [(name, config, 8, 2048) for name, config in presets.items()],
        "checkpointing": ("1b", presets["1b"], 8, 2048),
        "offload": ("1b", presets["1b"], 16, 2048),
        "kernels": [("350m", presets["350m"], 8, 2048), ("1b", presets["1b"], 8, 2048)],
    }


def _memory(sizes: list, device: torch.device) -> dict[str, Any]:
    """Predicted and measured peak of one AdamW step per model; the goal holds if every error is small."""
    rows = []
    for name, config, batch, seq in sizes:
        torch.manual_seed(0)
        with device:
            model = Llama(config)
        measured = measure_step_memory(model, batch, seq, compute_dtype=torch.bfloat16)
        predicted = predict_step_memory(config, batch, seq, compute_dtype=torch.bfloat16)
        rows.append(
            {
                "model": name,
                "batch": batch,
                "seq_len": seq,
                "predicted_peak_bytes": predicted.peak,
                "predicted_peak_phase": predicted.peak_phase,
                "predicted_terms_bytes": dict(predicted.rows()),
                "measured_peak_bytes": measured.peak,
                "measured_before_bytes": measured.before,
                "error": measured.peak / predicted.peak - 1,
            }
        )
        del model
        _empty_cache(device)
    worst = max(abs(row["error"]) for row in rows)
    return {"rows": rows, "goal": GOALS["memory"], "worst_error": worst, "met": worst <= GOALS["memory"]}


def _checkpointing(size: tuple, device: torch.device) -> dict[str, Any]:
    name, config, batch, seq = size
    results = measure_checkpointing(config, batch, seq, device=device, dtype=_dtype(device))
    base = results["none"].step_ms
    extra = {mode: results[mode].step_ms / base - 1 for mode in ("selective", "full")}
    met = {mode: extra[mode] <= GOALS[f"checkpointing {mode}"] for mode in extra}
    return {
        "model": name,
        "batch": batch,
        "seq_len": seq,
        "modes": {
            mode: {
                "step_ms": m.step_ms,
                "peak_memory_bytes": m.peak_memory_bytes,
                "saved_activation_bytes": m.saved_activation_bytes,
                "result": m.result,
            }
            for mode, m in results.items()
        },
        "extra_time": extra,
        "goal": {mode: GOALS[f"checkpointing {mode}"] for mode in extra},
        "met": all(met.values()),
    }


def _offload(size: tuple, device: torch.device) -> dict[str, Any]:
    name, config, batch, seq = size
    variants = ("none", "offload", "offload+prefetch")
    results = measure_offload(config, batch, seq, variants=variants, device=device, dtype=_dtype(device))
    kept = {v: results[v].tokens_per_s / results["none"].tokens_per_s for v in variants}
    return {
        "model": name,
        "batch": batch,
        "seq_len": seq,
        "variants": {
            v: {
                "step_ms": m.step_ms,
                "tokens_per_s": m.tokens_per_s,
                "peak_memory_bytes": m.peak_memory_bytes,
                "result": m.result,
            }
            for v, m in results.items()
        },
        "throughput_kept": kept,
        "goal": GOALS["offload"],
        "met": kept["offload+prefetch"] >= GOALS["offload"],
    }


def _kernel_step(config: LlamaConfig, batch: int, seq: int, device: torch.device) -> dict[str, Any]:
    """One model through PyTorch's ops and through the Triton kernels, same weights, timed interleaved."""
    torch.manual_seed(0)
    with device:
        plain = Llama(config).to(dtype=torch.bfloat16)
        kernels = Llama(dataclasses.replace(config, use_kernels=True)).to(dtype=torch.bfloat16)
    kernels.load_state_dict(plain.state_dict())
    tokens, targets = random_batch(config, batch, seq, device=device)
    with torch.no_grad():
        losses = {
            "plain": plain.loss(tokens, targets).item(),
            "kernels": kernels.loss(tokens, targets).item(),
        }
    if abs(losses["kernels"] - losses["plain"]) > LOSS_RTOL * abs(losses["plain"]):
        raise AssertionError(f"the Triton path's loss differs from the plain path's: {losses}")

    def step(model: Llama) -> Callable[[], None]:
        def run() -> None:
            model.loss(tokens, targets).backward()
            model.zero_grad(set_to_none=True)

        return run

    comparison = compare(step(plain), step(kernels), names=("PyTorch ops", "Triton kernels"), device=device)
    return {"batch": batch, "seq_len": seq, "losses": losses, "comparison": comparison}


def _kernels(sizes: list, device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"skipped": "the Triton kernels run on a CUDA GPU only"}
    rows = {name: _kernel_step(config, batch, seq, device) for name, config, batch, seq in sizes}
    worst = min(row["comparison"].speedup for row in rows.values())
    return {
        "models": rows,
        "goal": GOALS["kernels"],
        "worst_speedup": worst,
        "met": worst >= GOALS["kernels"],
    }


def _dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU, as it trains; fp32 on a CPU, where bf16 matmuls are slow."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _summary(records: dict[str, dict[str, Any]]) -> str:
    """One line per goal: what was measured, the goal, met or not."""
    rows = []
    memory = records["memory"]
    rows.append(("memory predictor", f"worst error {memory['worst_error']:+.1%}", "<= 10%", memory["met"]))
    ckpt = records["checkpointing"]
    for mode, extra in ckpt["extra_time"].items():
        goal = ckpt["goal"][mode]
        rows.append((f"checkpointing {mode}", f"{extra:+.1%} step time", f"<= {goal:.0%}", extra <= goal))
    offload = records["offload"]
    kept = offload["throughput_kept"]["offload+prefetch"]
    rows.append(("offload + prefetch", f"{kept:.0%} of the throughput", ">= 70%", offload["met"]))
    kernels = records["kernels"]
    if "skipped" in kernels:
        rows.append(("Triton path", "skipped", ">= 1.0x", kernels["skipped"]))
    for name, row in kernels.get("models", {}).items():
        speedup = row["comparison"].speedup
        rows.append((f"Triton path, {name}", f"{speedup:.2f}x", ">= 1.0x", speedup >= GOALS["kernels"]))
    return format_table(["benchmark", "measured", "goal", "met"], rows)


def run_large_model_benchmarks(out_dir: Path, quick: bool = False) -> list[Path]:
    """Run the four week-5 measurements on this machine's GPU (or, quick, its CPU); save one JSON each."""
    device = benchmark_device(
        quick, "the week-5 benchmarks measure a GPU's memory and speed at 125M-1B parameters"
    )
    sizes = _sizes(quick)
    parts = {
        "memory": lambda: _memory(sizes["memory"], device),
        "checkpointing": lambda: _checkpointing(sizes["checkpointing"], device),
        "offload": lambda: _offload(sizes["offload"], device),
        "kernels": lambda: _kernels(sizes["kernels"], device),
    }
    env = environment(device)
    records, paths = {}, []
    for name, run in parts.items():
        print(f"running {name}{' (quick)' if quick else ''} ...", flush=True)
        records[name] = run()
        path = Path(out_dir) / f"large_models_{name}{'_quick' if quick else ''}.json"
        paths.append(
            save_results({"benchmark": name, **records[name], "quick": quick, "environment": env}, path)
        )
        _empty_cache(device)
    print(_summary(records))
    return paths
