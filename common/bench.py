"""Timing that can be trusted: the one way the course times code.

    r = bench(lambda: a @ b, name="matmul bf16 4096³", flops=2 * 4096**3, dtype=torch.bfloat16)
    print(r)
    # matmul bf16 4096³: 0.181 ms median (p20 0.180, p80 0.183, n=512), 759 TFLOP/s = 77% of peak [...]

How a GPU measurement works, and why:

- The GPU runs asynchronously: `time.perf_counter()` around a kernel launch measures the launch, not the
  kernel. So each repetition is bracketed by a pair of CUDA events recorded on the working stream, and
  the host synchronises once, after the last repetition; a sync per repetition would add its own latency
  and let the GPU idle between repetitions.
- The first calls are slow (allocation, cuBLAS heuristics, Triton compilation, clocks ramping up), so fn
  first runs for `warmup_ms` of wall time; that warm-up also tells how many repetitions fit in `rep_ms`.
- `cache="cold"` (the default) zeroes a buffer larger than L2 before every repetition, outside the
  timed events, so each repetition reads its inputs from DRAM as it would inside a real model where other
  layers run in between. `cache="warm"` leaves L2 as the previous repetition left it: inputs that fit in
  L2 come back fast, which flatters small kernels.
- Eager timing includes launch overhead wherever the GPU finishes kernels faster than the CPU launches
  them (tiny kernels: the GPU waits for the CPU), because that is what such code costs. The cold flush
  hides part of it: the CPU queues fn's kernels while the GPU is still flushing. `cuda_graph=True`
  captures fn into a CUDA graph and times replays, which removes launch overhead and leaves GPU time.
  A replay runs many calls of fn back to back, so graph mode is warm-cache only (cache="cold" with it
  is an error), as in triton.testing.do_bench_cudagraph.
- compare() times two functions interleaved (A, B, A, B, ...) in one process, so drift in clocks or
  background load hits both, and reports the median of per-pair ratios.
- The result carries the median (robust to the odd slow repetition) with p20/p80 spread, min, mean, n,
  throughput against the datasheet peak and against a measured copy bandwidth, peak memory, and the
  environment (GPU, clocks, versions: common.environment), so a number saved today can be judged later.

On a CPU the same API times with `time.perf_counter` and returns the same BenchResult type.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from common.environment import environment
from common.errors import EffdlError
from common.hardware import GPUSpec, NoGPUError, UnknownGPUError, default_device, dtype_key, gpu_spec

__all__ = [
    "BenchError",
    "BenchResult",
    "Comparison",
    "bench",
    "compare",
    "host_time_us",
    "measured_copy_bandwidth",
    "result_from_times",
    "save_results",
    "speedup_summary",
    "summarize",
]

Cache = Literal["cold", "warm"]
Timer = Literal["cuda_event", "cuda_graph", "perf_counter"]

WARMUP_MS = 25.0  # same defaults as triton.testing.do_bench, so the two are comparable
REP_MS = 100.0
# Repetitions are clamped: fewer than 10 gives no spread worth the name; beyond 10,000 the event
# objects cost host memory and the median no longer moves.
MIN_REPS = 10
MAX_REPS = 10_000
# In graph mode fn is unrolled until one replay lasts about this long: long enough that the few
# microseconds of graph launch per replay vanish (<0.5%), short enough for dozens of replays per rep_ms.
GRAPH_REPLAY_MS = 2.0
MAX_GRAPH_UNROLL = 1000
# The L2 flush writes max(2 x L2, 256 MiB). Twice L2 evicts everything even with L2's non-LRU
# replacement and its two partitions on A100/H100; the 256 MiB floor is what triton.testing.do_bench
# writes, so our cold numbers match theirs. Cost: ~0.1 ms per repetition on an H100 (outside the timed
# events, so it only lengthens the run).
FLUSH_MIN_BYTES = 256 * 2**20


class BenchError(EffdlError, RuntimeError):
    """fn failed while being benchmarked; the original exception is chained as __cause__."""


# ----------------------------------------------------------------------------------------------------
# Statistics: pure functions of the measured times, so they can be tested exactly.
# ----------------------------------------------------------------------------------------------------


def summarize(times_ms: Sequence[float]) -> dict[str, float | int]:
    """median, p20, p80, min, mean and n of per-repetition times (percentiles interpolate linearly)."""
    if len(times_ms) == 0:
        raise ValueError("no times to summarize: a benchmark needs at least one repetition")
    t = np.asarray(times_ms, dtype=float)
    p20, median, p80 = np.percentile(t, [20, 50, 80])
    return {
        "median_ms": float(median),
        "p20_ms": float(p20),
        "p80_ms": float(p80),
        "min_ms": float(t.min()),
        "mean_ms": float(t.mean()),
        "n": int(t.size),
    }


def speedup_summary(baseline_ms: Sequence[float], candidate_ms: Sequence[float]) -> dict[str, Any]:
    """Speedup of candidate over baseline from paired repetitions: median and p20/p80 of the ratios.

    Pair i ran back to back, so a clock or thermal drift hits both of its times; the ratio cancels it.
    """
    if len(baseline_ms) != len(candidate_ms) or len(baseline_ms) == 0:
        raise ValueError(
            f"need the same non-zero number of baseline and candidate times, "
            f"got {len(baseline_ms)} and {len(candidate_ms)}"
        )
    ratios = np.asarray(baseline_ms, dtype=float) / np.asarray(candidate_ms, dtype=float)
    p20, median, p80 = np.percentile(ratios, [20, 50, 80])
    return {
        "speedup": float(median),
        "speedup_p20": float(p20),
        "speedup_p80": float(p80),
        "ratios": [float(r) for r in ratios],
    }


# ----------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    """Three significant digits, no exponent: 0.181, 12.3, 759, 1979."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:#.3g}".rstrip(".")


def _pct(frac: float) -> str:
    return "<1%" if 0 < frac < 0.01 else f"{frac:.0%}"


@dataclass
class BenchResult:
    """One benchmark: per-repetition times in ms, their statistics, throughput and the environment.

    tflops/gbps are at the median time; frac_peak_* are fractions of the datasheet peak (None where the
    GPU or dtype is unknown, or on a CPU), frac_measured_bw of measured_copy_bandwidth(). env["notes"]
    says why a field is None.
    """

    name: str
    timer: Timer
    cache: Cache
    times_ms: list[float]
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    mean_ms: float
    n: int
    flops: float | None = None
    bytes: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    frac_peak_flops: float | None = None
    frac_peak_bw: float | None = None
    frac_measured_bw: float | None = None
    peak_memory_bytes: int | None = None
    env: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None  # DTYPES key the flops were counted in, for the peak

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchResult:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        s = (
            f"{self.name}: {_fmt(self.median_ms)} ms median "
            f"(p20 {_fmt(self.p20_ms)}, p80 {_fmt(self.p80_ms)}, n={self.n})"
        )
        if self.tflops is not None:
            s += f", {_fmt(self.tflops)} TFLOP/s"
            if self.frac_peak_flops is not None:
                s += f" = {_pct(self.frac_peak_flops)} of peak"
        if self.gbps is not None:
            s += f", {_fmt(self.gbps)} GB/s"
            if self.frac_peak_bw is not None:
                s += f" = {_pct(self.frac_peak_bw)} of peak"
            if self.frac_measured_bw is not None:
                s += f" ({_pct(self.frac_measured_bw)} of measured copy)"
        return s + f" [{self.timer}, {self.cache} cache]"


@dataclass
class Comparison:
    """Baseline and candidate timed interleaved; speedup = baseline time / candidate time per pair."""

    baseline: BenchResult
    candidate: BenchResult
    speedup: float
    speedup_p20: float
    speedup_p80: float
    ratios: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline.to_dict(),
            "candidate": self.candidate.to_dict(),
            "speedup": self.speedup,
            "speedup_p20": self.speedup_p20,
            "speedup_p80": self.speedup_p80,
            "ratios": self.ratios,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Comparison:
        return cls(
            baseline=BenchResult.from_dict(d["baseline"]),
            candidate=BenchResult.from_dict(d["candidate"]),
            speedup=d["speedup"],
            speedup_p20=d["speedup_p20"],
            speedup_p80=d["speedup_p80"],
            ratios=d["ratios"],
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        s = self.speedup
        verdict = f"{s:.2f}x faster" if s >= 1 else f"{1 / s:.2f}x slower"
        return (
            f"{self.candidate.name} vs {self.baseline.name}: {verdict} "
            f"(speedup p20 {self.speedup_p20:.2f}, p80 {self.speedup_p80:.2f}, n={len(self.ratios)} pairs)\n"
            f"  {self.baseline}\n  {self.candidate}"
        )


def result_from_times(
    name: str,
    times_ms: Sequence[float],
    *,
    timer: Timer,
    cache: Cache,
    flops: float | None = None,
    bytes: float | None = None,
    dtype: str | None = None,
    peak_flops_per_s: float | None = None,
    peak_bandwidth: float | None = None,
    measured_bandwidth: float | None = None,
    peak_memory_bytes: int | None = None,
    env: dict[str, Any] | None = None,
) -> BenchResult:
    """Build a BenchResult from measured times. Pure (no device access): bench() calls it after timing.

    Peaks are in FLOP/s and bytes/s; a fraction is None where its peak is None.
    """
    stats = summarize(times_ms)
    seconds = stats["median_ms"] / 1e3
    flops_per_s = flops / seconds if flops is not None and seconds > 0 else None
    bytes_per_s = bytes / seconds if bytes is not None and seconds > 0 else None

    def frac(rate: float | None, peak: float | None) -> float | None:
        return rate / peak if rate is not None and peak else None

    return BenchResult(
        name=name,
        timer=timer,
        cache=cache,
        times_ms=[float(t) for t in times_ms],
        **stats,
        flops=flops,
        bytes=bytes,
        tflops=flops_per_s / 1e12 if flops_per_s is not None else None,
        gbps=bytes_per_s / 1e9 if bytes_per_s is not None else None,
        frac_peak_flops=frac(flops_per_s, peak_flops_per_s),
        frac_peak_bw=frac(bytes_per_s, peak_bandwidth),
        frac_measured_bw=frac(bytes_per_s, measured_bandwidth),
        peak_memory_bytes=peak_memory_bytes,
        env=dict(env or {}),
        dtype=dtype,
    )


# ----------------------------------------------------------------------------------------------------
# Argument checks: each error names the problem and the fix.
# ----------------------------------------------------------------------------------------------------


def _check_fn(fn: object, what: str = "fn") -> None:
    if not callable(fn):
        raise TypeError(
            f"{what} must be a function that takes no arguments, got {type(fn).__name__} {fn!r}; "
            "wrap the call you want to time: bench(lambda: f(x))"
        )
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: let the call decide
        return
    required = [
        p.name
        for p in sig.parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if required:
        raise TypeError(
            f"{what} must take no arguments, but {getattr(fn, '__name__', fn)!r} requires {required}; "
            "bind them: bench(lambda: f(x)) or functools.partial(f, x)"
        )


def _check_args(
    flops: float | None,
    nbytes: float | None,
    cache: str | None,
    cuda_graph: bool,
    warmup_ms: float,
    rep_ms: float,
    min_reps: int,
    max_reps: int,
) -> Cache:
    """Validate the arguments shared by bench() and compare(); return the resolved cache mode."""
    if flops is not None and not flops > 0:
        raise ValueError(
            f"flops must be the positive number of floating-point operations one call of fn performs, "
            f"got {flops!r}; leave flops=None if you don't know it"
        )
    if nbytes is not None and not nbytes >= 0:
        raise ValueError(
            f"bytes must be the number of bytes one call of fn moves to and from memory (>= 0), "
            f"got {nbytes!r}; leave bytes=None if you don't know it"
        )
    if cache not in (None, "cold", "warm"):
        raise ValueError(
            f"unknown cache mode {cache!r}: use cache='cold' (flush L2 before each repetition, the "
            "default) or cache='warm' (keep whatever the previous repetition left in L2)"
        )
    # A graph replays many calls of fn back to back, and a flush inside the graph would be timed with
    # them: cold is not measurable there, so graph mode is warm (as in do_bench_cudagraph).
    if cuda_graph and cache == "cold":
        raise ValueError(
            "cache='cold' cannot be combined with cuda_graph=True: the calls inside one graph replay "
            "run back to back, so only the first would see a cold L2. Use cache='warm' (the default "
            "with cuda_graph=True) or cuda_graph=False to time with a cold L2"
        )
    if warmup_ms < 0 or rep_ms < 0:
        raise ValueError(f"warmup_ms and rep_ms must be >= 0, got {warmup_ms} and {rep_ms}")
    if not 1 <= min_reps <= max_reps:
        raise ValueError(f"need 1 <= min_reps <= max_reps, got min_reps={min_reps}, max_reps={max_reps}")
    if cache is None:
        return "warm" if cuda_graph else "cold"
    return cache  # type: ignore[return-value]


def _resolve_device(device: torch.device | str | int | None, cuda_graph: bool) -> torch.device:
    if device is None:
        device = default_device()
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise NoGPUError(
                f"device={str(device)!r} was requested, but no CUDA GPU is available "
                "(torch.cuda.is_available() is False). Leave device=None, or pass device='cpu', to time "
                "on the CPU with time.perf_counter, with fn's tensors on the CPU."
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(
            f"bench times CUDA GPUs (with CUDA events) and CPUs (with perf_counter), got {device}"
        )
    if cuda_graph and device.type != "cuda":
        raise ValueError(
            "cuda_graph=True needs a CUDA GPU, but the benchmark runs on the CPU; "
            "leave cuda_graph=False to time on the CPU with perf_counter"
        )
    return device


def _failure(name: str, phase: str, err: BaseException) -> BenchError:
    msg = f"benchmark {name!r}: fn raised during {phase}: {type(err).__name__}: {err}"
    text = str(err).lower()
    if not torch.cuda.is_available() and ("cuda" in text or "nvidia" in text):
        msg += (
            "\nfn seems to use CUDA, but no CUDA GPU is available here (torch.cuda.is_available() is "
            "False). Create fn's tensors on common.hardware.default_device() (the CPU here) so it runs, "
            "and is timed with perf_counter, on the CPU; or run on a machine with a CUDA GPU."
        )
    return BenchError(msg)


# ----------------------------------------------------------------------------------------------------
# The measurement
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """One side of a measurement, warmed up and ready to time."""

    name: str
    step: Callable[[], object]  # one repetition: fn(), or one replay of a graph of fn
    calls_per_step: int  # > 1 when a graph unrolls fn
    step_ms: float  # wall time of one repetition (flush included), from the warm-up
    graph: torch.cuda.CUDAGraph | None = None  # kept alive while its replays are timed
    peak_memory_bytes: int | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_flush(device: torch.device, cache: Cache) -> Callable[[], object] | None:
    if cache == "warm" or device.type != "cuda":
        return None
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    nbytes = max(2 * l2, FLUSH_MIN_BYTES)
    buffer = torch.empty(nbytes // 4, dtype=torch.int32, device=device)
    return buffer.zero_  # one memset-like kernel writing the whole buffer


def _warm_up(
    name: str,
    step: Callable[[], object],
    flush: Callable[[], object] | None,
    device: torch.device,
    warmup_ms: float,
) -> float:
    """Run step for about warmup_ms of wall time; return the wall time of one step (flush included), ms.
    Its first call has run already (_prepare), so compilation does not count in the estimate."""
    try:
        start = time.perf_counter()
        batch, step_ms = 1, 0.0
        while True:
            t0 = time.perf_counter()
            for _ in range(batch):
                if flush is not None:
                    flush()
                step()
            _sync(device)  # note: a host-device sync per batch, so the wall clock sees the GPU's work
            step_ms = (time.perf_counter() - t0) * 1e3 / batch
            remaining_ms = warmup_ms - (time.perf_counter() - start) * 1e3
            if remaining_ms <= 0:
                return step_ms
            # Grow batches geometrically, but don't overshoot the warm-up budget much.
            batch = max(1, min(2 * batch, int(remaining_ms / max(step_ms, 1e-6)) + 1))
    except Exception as err:
        raise _failure(name, "warm-up", err) from err


def _n_reps(step_ms: float, rep_ms: float, min_reps: int, max_reps: int) -> int:
    return max(min_reps, min(max_reps, int(rep_ms / max(step_ms, 1e-6))))


def _capture(
    name: str, fn: Callable[[], object], unroll: int, stream: torch.cuda.Stream
) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(unroll):
                fn()
    except Exception as err:
        raise BenchError(
            f"benchmark {name!r}: fn raised during CUDA graph capture: {type(err).__name__}: {err}\n"
            "A captured fn must stay on the GPU: no .item(), .cpu(), print(tensor), data-dependent "
            "shapes or host-to-device copies of fresh CPU tensors. Pass cuda_graph=False to time it "
            "eagerly (launch overhead included)."
        ) from err
    return graph


def _replay_ms(graph: torch.cuda.CUDAGraph, device: torch.device, n: int = 3) -> float:
    graph.replay()  # the first replay uploads the graph to the device: keep it out of the estimate
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        graph.replay()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3 / n


def _prepare(
    name: str,
    fn: Callable[[], object],
    device: torch.device,
    flush: Callable[[], object] | None,
    cuda_graph: bool,
    warmup_ms: float,
) -> _Plan:
    """Warm fn up (and capture it into a graph if asked); measure its peak memory on the way, from its
    second call: the first compiles and autotunes, and Triton's tuner times each config with a 256 MB
    buffer of its own, which is not memory the op needs."""
    # The first call pays for compilation, autotuning, allocation and library set-up: run it apart, so it
    # counts in neither the warm-up's estimate nor the peak memory, and raises nowhere but here.
    try:
        fn()
        _sync(device)
    except Exception as err:
        raise _failure(name, "warm-up", err) from err
    base = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    if not cuda_graph:
        step_ms = _warm_up(name, fn, flush, device, warmup_ms)
        plan = _Plan(name, fn, 1, step_ms)
    else:
        # Warm up on a side stream, as torch.cuda.graph requires, then capture on the same stream.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            call_ms = _warm_up(name, fn, None, device, warmup_ms)
        torch.cuda.current_stream(device).wait_stream(side)
        # The eager estimate includes launch overhead, so it overestimates tiny kernels: if the first
        # graph comes out short, capture once more with a longer unroll.
        unroll = max(1, min(MAX_GRAPH_UNROLL, math.ceil(GRAPH_REPLAY_MS / max(call_ms, 1e-6))))
        graph = _capture(name, fn, unroll, side)
        replay_ms = _replay_ms(graph, device)
        if replay_ms < GRAPH_REPLAY_MS / 2 and unroll < MAX_GRAPH_UNROLL:
            unroll = max(1, min(MAX_GRAPH_UNROLL, math.ceil(unroll * GRAPH_REPLAY_MS / max(replay_ms, 1e-6))))
            del graph
            graph = _capture(name, fn, unroll, side)
            replay_ms = _replay_ms(graph, device)
        plan = _Plan(name, graph.replay, unroll, replay_ms, graph=graph)
    if device.type == "cuda":
        _sync(device)
        plan.peak_memory_bytes = max(0, torch.cuda.max_memory_allocated(device) - base)
    return plan


def _time_interleaved(
    plans: list[_Plan], n: int, flush: Callable[[], object] | None, device: torch.device
) -> list[list[float]]:
    """Time n rounds of [plan 0, plan 1, ...]; per-call times in ms, one list per plan."""
    # Garbage collection pauses would land in random repetitions (timeit disables it too).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if device.type == "cuda":
            # All events exist before the loop, so creating them costs nothing inside it.
            starts = [[torch.cuda.Event(enable_timing=True) for _ in range(n)] for _ in plans]
            ends = [[torch.cuda.Event(enable_timing=True) for _ in range(n)] for _ in plans]
            for i in range(n):
                for p, plan in enumerate(plans):
                    if flush is not None:
                        flush()  # before the start event: the flush is not timed
                    starts[p][i].record()
                    plan.step()
                    ends[p][i].record()
            torch.cuda.synchronize(device)  # the one host-device sync of the timed loop
            return [
                [s.elapsed_time(e) / plan.calls_per_step for s, e in zip(starts[p], ends[p], strict=True)]
                for p, plan in enumerate(plans)
            ]
        times: list[list[float]] = [[] for _ in plans]
        for _ in range(n):
            for p, plan in enumerate(plans):
                t0 = time.perf_counter()
                plan.step()
                times[p].append((time.perf_counter() - t0) * 1e3 / plan.calls_per_step)
        return times
    except Exception as err:
        raise _failure(
            plans[0].name if len(plans) == 1 else "/".join(p.name for p in plans), "timing", err
        ) from err
    finally:
        if gc_was_enabled:
            gc.enable()


def _spec_or_none(device: torch.device, notes: list[str], wants_peak: bool) -> GPUSpec | None:
    if device.type != "cuda":
        if wants_peak:
            notes.append("CPU timer: no datasheet peak, so frac_peak_flops and frac_peak_bw are None")
        return None
    try:
        return gpu_spec(device)
    except UnknownGPUError:
        notes.append(
            f"unknown GPU {torch.cuda.get_device_name(device)!r}: no datasheet peaks in "
            "common.hardware.SPECS, so frac_peak_flops and frac_peak_bw are None (register a GPUSpec)"
        )
        return None


def _finish(
    plan: _Plan,
    times_ms: list[float],
    *,
    timer: Timer,
    cache: Cache,
    device: torch.device,
    flops: float | None,
    nbytes: float | None,
    dtype: str | None,
    env: dict[str, Any],
    notes: list[str],
) -> BenchResult:
    """Attach peaks, measured bandwidth and environment to the times of one plan."""
    notes = list(notes)
    spec = _spec_or_none(device, notes, wants_peak=flops is not None or nbytes is not None)
    peak = None
    if flops is not None and dtype is None:
        notes.append("flops given without dtype: pass dtype= to get frac_peak_flops")
    elif flops is not None and spec is not None:
        peak = spec.peak_flops.get(dtype)  # type: ignore[arg-type]
        if peak is None:
            notes.append(f"{spec.name} has no {dtype} peak, so frac_peak_flops is None")
    measured = None
    if nbytes is not None:
        try:
            measured = measured_copy_bandwidth(device)
        except Exception as err:  # a failed ceiling must not lose the measurement
            notes.append(f"measured_copy_bandwidth failed ({type(err).__name__}: {err})")
    env = {**env, "timer": timer, "cache": cache, "spec": spec.name if spec else None, "notes": notes}
    if plan.calls_per_step > 1:
        env["graph_unroll"] = plan.calls_per_step
    return result_from_times(
        plan.name,
        times_ms,
        timer=timer,
        cache=cache,
        flops=flops,
        bytes=nbytes,
        dtype=dtype,
        peak_flops_per_s=peak,
        peak_bandwidth=spec.mem_bandwidth if spec and nbytes is not None else None,
        measured_bandwidth=measured,
        peak_memory_bytes=plan.peak_memory_bytes,
        env=env,
    )


def _run(
    fns: list[Callable[[], object]],
    names: list[str],
    *,
    flops: float | None,
    nbytes: float | None,
    dtype: torch.dtype | str | None,
    cache: Cache | None,
    cuda_graph: bool,
    warmup_ms: float,
    rep_ms: float,
    min_reps: int,
    max_reps: int,
    device: torch.device | str | int | None,
) -> list[BenchResult]:
    """Shared by bench() and compare(): check, warm up, time interleaved, summarise."""
    for i, fn in enumerate(fns):
        _check_fn(fn, "fn" if len(fns) == 1 else ("baseline", "candidate")[i])
    resolved_cache = _check_args(flops, nbytes, cache, cuda_graph, warmup_ms, rep_ms, min_reps, max_reps)
    dev = _resolve_device(device, cuda_graph)
    key = dtype_key(dtype) if dtype is not None else None
    notes: list[str] = []
    if dev.type == "cpu" and resolved_cache == "cold":
        # Flushing a CPU's caches from Python is neither cheap nor reliable: say so instead of pretending.
        resolved_cache = "warm"
        notes.append(
            "CPU timer: caches are not flushed (cache='cold' applies to a GPU's L2), so cache is warm"
        )
    timer: Timer = "perf_counter" if dev.type == "cpu" else ("cuda_graph" if cuda_graph else "cuda_event")

    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        flush = _make_flush(dev, resolved_cache)
        # Peak memory is measured per side during its warm-up (and capture); in compare() the timed
        # repetitions interleave the two sides, so they can't be told apart there.
        plans = [
            _prepare(name, fn, dev, flush, cuda_graph, warmup_ms) for fn, name in zip(fns, names, strict=True)
        ]
        if len(plans) == 1 and dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        # Each side gets rep_ms, as if benchmarked alone.
        n = _n_reps(sum(p.step_ms for p in plans) / len(plans), rep_ms, min_reps, max_reps)
        times = _time_interleaved(plans, n, flush, dev)
        if len(plans) == 1 and dev.type == "cuda":
            peak_run = torch.cuda.max_memory_allocated(dev) - base
            plans[0].peak_memory_bytes = max(plans[0].peak_memory_bytes or 0, peak_run)
        del flush
        env = environment(dev)
        return [
            _finish(
                plan,
                t,
                timer=timer,
                cache=resolved_cache,
                device=dev,
                flops=flops,
                nbytes=nbytes,
                dtype=key,
                env=env,
                notes=notes,
            )
            for plan, t in zip(plans, times, strict=True)
        ]


def _default_name(fn: Callable[[], object]) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def bench(
    fn: Callable[[], object],
    *,
    name: str | None = None,
    flops: float | None = None,
    bytes: float | None = None,
    dtype: torch.dtype | str | None = None,
    cache: Cache | None = None,
    cuda_graph: bool = False,
    warmup_ms: float = WARMUP_MS,
    rep_ms: float = REP_MS,
    min_reps: int = MIN_REPS,
    max_reps: int = MAX_REPS,
    device: torch.device | str | int | None = None,
) -> BenchResult:
    """Time fn() (no arguments) and return per-repetition statistics, throughput and environment.

    flops, bytes: work done and memory moved by one call, for TFLOP/s and GB/s (at the median).
    dtype: the dtype the flops are done in (torch.bfloat16, "tf32", ...), to get frac_peak_flops.
    cache: "cold" (default) flushes L2 before each repetition; "warm" does not. Default "warm" with
        cuda_graph=True, where "cold" is an error (a replay runs its calls back to back).
    cuda_graph: capture fn into a CUDA graph (unrolled to ~GRAPH_REPLAY_MS per replay) and time replays:
        no launch overhead. fn must be capturable (no host syncs).
    warmup_ms, rep_ms: wall-time budgets for warm-up and for the timed repetitions, which are clamped to
        [min_reps, max_reps].
    device: where fn runs and what times it: a CUDA device (CUDA events) or "cpu" (perf_counter).
        Default: the current CUDA device if any, else the CPU.

    peak_memory_bytes is the most memory fn held at once above what was allocated after its first call
    (which compiles and autotunes; what that call keeps, such as a cuBLAS workspace, is not counted, a CUDA
    graph's memory pool is); measuring it resets torch.cuda's peak-memory statistics.
    """
    name = name or _default_name(fn)
    (result,) = _run(
        [fn],
        [name],
        flops=flops,
        nbytes=bytes,
        dtype=dtype,
        cache=cache,
        cuda_graph=cuda_graph,
        warmup_ms=warmup_ms,
        rep_ms=rep_ms,
        min_reps=min_reps,
        max_reps=max_reps,
        device=device,
    )
    return result


def compare(
    baseline: Callable[[], object],
    candidate: Callable[[], object],
    *,
    names: tuple[str, str] = ("baseline", "candidate"),
    flops: float | None = None,
    bytes: float | None = None,
    dtype: torch.dtype | str | None = None,
    cache: Cache | None = None,
    cuda_graph: bool = False,
    warmup_ms: float = WARMUP_MS,
    rep_ms: float = REP_MS,
    min_reps: int = MIN_REPS,
    max_reps: int = MAX_REPS,
    device: torch.device | str | int | None = None,
) -> Comparison:
    """Time two functions that do the same work, interleaved (A, B, A, B, ...) in this process.

    Interleaving puts clock, thermal and background drift on both sides equally; the speedup is the
    median of per-pair ratios baseline/candidate (> 1: candidate is faster), with p20/p80. Keyword
    arguments as in bench(); flops/bytes/dtype describe the work of one call of either side.
    Each side's peak memory is measured during its own warm-up, as the timed calls interleave.
    """
    if len(names) != 2:
        raise ValueError(f"names must be two labels (baseline, candidate), got {names!r}")
    base, cand = _run(
        [baseline, candidate],
        list(names),
        flops=flops,
        nbytes=bytes,
        dtype=dtype,
        cache=cache,
        cuda_graph=cuda_graph,
        warmup_ms=warmup_ms,
        rep_ms=rep_ms,
        min_reps=min_reps,
        max_reps=max_reps,
        device=device,
    )
    s = speedup_summary(base.times_ms, cand.times_ms)
    return Comparison(base, cand, s["speedup"], s["speedup_p20"], s["speedup_p80"], s["ratios"])


# ----------------------------------------------------------------------------------------------------
# Ceiling and saving
# ----------------------------------------------------------------------------------------------------

_COPY_BANDWIDTH: dict[str, float] = {}


# host_time_us: how many calls to time, and how long the GPU sleeps meanwhile (1e9 cycles: 0.5 s at 2 GHz),
# long enough that even a slow host issues every call before the GPU wakes up.
HOST_CALLS = 200
HOST_SLEEP_CYCLES = 1_000_000_000


def host_time_us(
    fn: Callable[[], object], *, calls: int = HOST_CALLS, device: torch.device | str | int | None = None
) -> float:
    """Median time the host spends in one call of fn, in µs: the cost of issuing the work, not of doing it.

    On a GPU the calls are made while a sleeping kernel holds the stream, so their launches queue behind
    it and no call waits for the GPU. If the sleep ends before the last call returns (fn synchronises, or
    the host is very slow), the times would include GPU work, and a BenchError says so. On a CPU, where
    every call does its work before returning, it is the median wall time of a call.
    """
    dev = _resolve_device(device, cuda_graph=False)
    fn()  # one-time costs (compiling, autotuning, caches) are not what this measures
    asleep = None
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        with torch.cuda.device(dev):
            torch.cuda._sleep(HOST_SLEEP_CYCLES)
            asleep = torch.cuda.Event()
            asleep.record()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    if asleep is not None:
        woke_up = asleep.query()
        torch.cuda.synchronize(dev)
        if woke_up:
            raise BenchError(
                f"the GPU finished its sleep before {calls} calls were issued: the function waits for the GPU "
                "(a .item(), .cpu() or synchronize inside?), so its host time cannot be separated"
            )
    return float(np.median(times) * 1e6)


def measured_copy_bandwidth(device: torch.device | str | int | None = None) -> float:
    """Bytes/s of a large device-to-device copy (read + write): the bandwidth a kernel can really reach.

    Datasheet bandwidth is rarely attainable (~90% on an H100); this is the honest ceiling for
    memory-bound kernels. Measured once per device per process (~0.2 s), then cached.
    """
    dev = _resolve_device(device, cuda_graph=False)
    key = str(dev)
    if key not in _COPY_BANDWIDTH:
        if dev.type == "cuda":
            # Far larger than any L2 so the copy streams from DRAM; capped to a quarter of free memory.
            l2 = torch.cuda.get_device_properties(dev).L2_cache_size
            nbytes = min(max(512 * 2**20, 8 * l2), torch.cuda.mem_get_info(dev)[0] // 4)
        else:
            nbytes = 64 * 2**20  # larger than most CPU last-level caches; a copy takes ~10 ms
        src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        result = bench(
            lambda: dst.copy_(src), name="copy", cache="warm", warmup_ms=10, rep_ms=50, min_reps=5, device=dev
        )
        _COPY_BANDWIDTH[key] = 2 * nbytes / (result.median_ms / 1e3)
        del src, dst
    return _COPY_BANDWIDTH[key]


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return _jsonable(obj.to_dict())
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path | torch.dtype | torch.device):
        return str(obj)
    return obj


def save_results(obj: Any, path: str | Path) -> Path:
    """Write a BenchResult, Comparison, dict, or a list of them, as indented JSON; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(obj), indent=2) + "\n")
    return path
