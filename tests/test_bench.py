"""common.bench on the CPU: statistics, throughput arithmetic, JSON, interleaved comparison, errors.

No wall-clock thresholds: timings are checked only through ratios with generous bounds, and the
arithmetic on injected times.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common import bench as bench_module
from common.bench import (
    BenchError,
    BenchResult,
    Comparison,
    bench,
    compare,
    measured_copy_bandwidth,
    result_from_times,
    save_results,
    speedup_summary,
    summarize,
)
from common.hardware import NoGPUError
from common.weeks import REPO_ROOT

FAST = {"warmup_ms": 1, "rep_ms": 5, "min_reps": 5, "max_reps": 50}
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA GPU")


def busy(n: int) -> int:
    """Deterministic CPU work proportional to n (no sleep: sleep measures the scheduler)."""
    return sum(range(n))


# ---------------------------------------------------------------------------------------------------
# Statistics on known samples
# ---------------------------------------------------------------------------------------------------


def test_summarize_known_sample() -> None:
    # Linear interpolation between order statistics, as numpy and triton.testing do:
    # p20 of [1, 2, 3, 4, 5] sits at index 0.8 -> 1.8.
    s = summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert s == pytest.approx(
        {"median_ms": 3.0, "p20_ms": 1.8, "p80_ms": 4.2, "min_ms": 1.0, "mean_ms": 3.0, "n": 5}
    )


def test_summarize_matches_numpy() -> None:
    t = np.random.default_rng(0).lognormal(mean=-1.0, sigma=0.3, size=1001)
    s = summarize(list(t))
    assert s["median_ms"] == pytest.approx(np.median(t), rel=1e-12)
    assert s["p20_ms"] == pytest.approx(np.percentile(t, 20), rel=1e-12)
    assert s["p80_ms"] == pytest.approx(np.percentile(t, 80), rel=1e-12)
    assert s["min_ms"] == t.min() and s["mean_ms"] == pytest.approx(t.mean(), rel=1e-12)
    assert s["n"] == 1001
    assert all(type(v) in (float, int) for v in s.values())  # plain Python numbers, JSON-ready


def test_summarize_empty() -> None:
    with pytest.raises(ValueError, match="at least one repetition"):
        summarize([])


def test_speedup_on_injected_times() -> None:
    base = [4.0, 4.4, 3.6, 8.0, 4.0]  # one slow outlier in pair 3, hitting both sides (drift)
    cand = [1.0, 1.1, 0.9, 2.0, 2.0]
    s = speedup_summary(base, cand)
    ratios = np.array(base) / np.array(cand)
    assert s["ratios"] == pytest.approx(list(ratios))
    assert s["speedup"] == pytest.approx(4.0)
    assert s["speedup_p20"] == pytest.approx(np.percentile(ratios, 20))
    assert s["speedup_p80"] == pytest.approx(np.percentile(ratios, 80))
    with pytest.raises(ValueError, match="same non-zero number"):
        speedup_summary([1.0, 2.0], [1.0])


def test_throughput_arithmetic_on_injected_times() -> None:
    # 2 ms median; 1e12 FLOP -> 500 TFLOP/s; 4e9 bytes -> 2000 GB/s.
    r = result_from_times(
        "fake",
        [1.0, 2.0, 3.0],
        timer="cuda_event",
        cache="cold",
        flops=1e12,
        bytes=4e9,
        dtype="bf16",
        peak_flops_per_s=1000e12,
        peak_bandwidth=4e12,
        measured_bandwidth=2.5e12,
    )
    assert r.median_ms == 2.0 and r.n == 3
    assert r.tflops == pytest.approx(500.0)
    assert r.gbps == pytest.approx(2000.0)
    assert r.frac_peak_flops == pytest.approx(0.5)
    assert r.frac_peak_bw == pytest.approx(0.5)
    assert r.frac_measured_bw == pytest.approx(0.8)
    line = str(r)
    assert line.startswith("fake: 2.00 ms median (p20 1.40, p80 2.60, n=3)")
    assert "500 TFLOP/s = 50% of peak" in line and "2000 GB/s = 50% of peak (80% of measured copy)" in line


def test_unknown_peaks_leave_fractions_none() -> None:
    # 1e9 FLOP and 1e6 bytes in 1 ms: 1 TFLOP/s and 1 GB/s.
    r = result_from_times("fake", [1.0], timer="cuda_event", cache="cold", flops=1e9, bytes=1e6)
    assert r.tflops == pytest.approx(1.0) and r.gbps == pytest.approx(1.0)
    assert r.frac_peak_flops is None and r.frac_peak_bw is None and r.frac_measured_bw is None
    assert "of peak" not in str(r)


# ---------------------------------------------------------------------------------------------------
# CPU fallback and JSON
# ---------------------------------------------------------------------------------------------------


def test_cpu_fallback_result() -> None:
    x = torch.randn(4096)
    r = bench(lambda: x * 2, name="x*2", flops=x.numel(), dtype=torch.float32, device="cpu", **FAST)
    assert isinstance(r, BenchResult)
    assert r.timer == "perf_counter"
    assert r.cache == "warm"  # a CPU's caches are not flushed, and the result says so
    assert any("not flushed" in note for note in r.env["notes"])
    assert 5 <= r.n <= 50 and len(r.times_ms) == r.n
    assert r.min_ms <= r.p20_ms <= r.median_ms <= r.p80_ms
    assert r.tflops is not None and r.frac_peak_flops is None  # no datasheet peak for a CPU
    assert r.peak_memory_bytes is None
    assert r.dtype == "fp32"
    assert r.env["device"] == "cpu" and r.env["torch"] == torch.__version__ and r.env["python"]


def test_reps_are_clamped() -> None:
    assert bench(lambda: None, device="cpu", warmup_ms=0, rep_ms=0, min_reps=7, max_reps=9).n == 7
    assert bench(lambda: None, device="cpu", warmup_ms=0, rep_ms=1000, min_reps=1, max_reps=12).n == 12


def test_default_name_is_the_function_name() -> None:
    def my_kernel() -> None:
        busy(10)

    assert bench(my_kernel, device="cpu", **FAST).name == "my_kernel"


def test_json_round_trip(tmp_path: Path) -> None:
    r = bench(lambda: busy(1000), name="busy", flops=1000, bytes=0, device="cpu", **FAST)
    again = BenchResult.from_dict(json.loads(r.to_json()))
    assert again == r
    c = compare(lambda: busy(2000), lambda: busy(1000), names=("slow", "fast"), device="cpu", **FAST)
    assert Comparison.from_dict(json.loads(c.to_json())) == c
    path = save_results([r, c, {"note": "anything JSON"}], tmp_path / "sub" / "results.json")
    assert path.exists()
    loaded = json.loads(path.read_text())
    assert BenchResult.from_dict(loaded[0]) == r
    assert Comparison.from_dict(loaded[1]) == c
    assert loaded[2] == {"note": "anything JSON"}


def test_host_time_on_cpu_is_the_median_wall_time_of_a_call() -> None:
    """Every call sleeps at least 1 ms, and the first call (one-time costs) is not counted."""
    import time

    calls = []

    def step() -> None:
        calls.append(None)
        time.sleep(0.001)

    assert bench_module.host_time_us(step, calls=5, device="cpu") >= 1000
    assert len(calls) == 6


def test_measured_copy_bandwidth_cpu_is_cached() -> None:
    bw = measured_copy_bandwidth("cpu")
    assert bw > 0
    assert measured_copy_bandwidth("cpu") == bw  # measured once per device
    r = bench(lambda: None, bytes=1e6, device="cpu", **FAST)
    assert r.frac_measured_bw is not None and r.frac_peak_bw is None


# ---------------------------------------------------------------------------------------------------
# compare(): interleaved, ratio of a known cost ratio
# ---------------------------------------------------------------------------------------------------


def test_compare_recovers_a_known_cost_ratio() -> None:
    # 4x the work should be ~4x slower; the band is generous because a shared 2-core runner is noisy,
    # but interleaving means noise hits both sides of each pair.
    c = compare(lambda: busy(40_000), lambda: busy(10_000), names=("4x", "1x"), device="cpu", **FAST)
    assert 2.0 < c.speedup < 8.0
    assert c.speedup_p20 <= c.speedup <= c.speedup_p80
    assert c.baseline.name == "4x" and c.candidate.name == "1x"
    assert c.baseline.n == c.candidate.n == len(c.ratios)
    assert "faster" in str(c)
    assert "slower" in str(compare(lambda: busy(1000), lambda: busy(8000), device="cpu", **FAST))


def test_compare_interleaves() -> None:
    calls: list[str] = []
    compare(
        lambda: calls.append("A"), lambda: calls.append("B"), device="cpu", warmup_ms=0, rep_ms=0, min_reps=4
    )
    # Warm-up runs each side alone; the timed part alternates A, B, A, B ...
    assert "".join(calls).endswith("ABABABAB")


# ---------------------------------------------------------------------------------------------------
# Errors: each names the problem and the fix
# ---------------------------------------------------------------------------------------------------


def test_fn_not_callable() -> None:
    with pytest.raises(TypeError, match="must be a function that takes no arguments.*lambda"):
        bench(42, device="cpu")  # type: ignore[arg-type]


def test_fn_with_required_arguments() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    with pytest.raises(TypeError, match=r"requires \['x'\].*lambda: f\(x\)"):
        bench(f, device="cpu")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="candidate must be a function"):
        compare(lambda: None, "nope", device="cpu")  # type: ignore[arg-type]


@pytest.mark.parametrize("flops", [0, -1.0, float("nan")])
def test_bad_flops(flops: float) -> None:
    with pytest.raises(ValueError, match="flops must be the positive number.*flops=None"):
        bench(lambda: None, flops=flops, device="cpu")


def test_bad_bytes() -> None:
    with pytest.raises(ValueError, match=r"bytes must be .*\(>= 0\), got -8"):
        bench(lambda: None, bytes=-8, device="cpu")


def test_unknown_cache_mode() -> None:
    with pytest.raises(ValueError, match="unknown cache mode 'hot'.*'cold'.*'warm'"):
        bench(lambda: None, cache="hot", device="cpu")  # type: ignore[arg-type]


def test_cold_cache_with_cuda_graph() -> None:
    with pytest.raises(ValueError, match="cache='cold' cannot be combined with cuda_graph=True"):
        bench(lambda: None, cache="cold", cuda_graph=True)


def test_cuda_graph_on_cpu() -> None:
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA GPU"):
        bench(lambda: None, cuda_graph=True, device="cpu")


def test_bad_budgets() -> None:
    with pytest.raises(ValueError, match="warmup_ms and rep_ms must be >= 0"):
        bench(lambda: None, rep_ms=-1, device="cpu")
    with pytest.raises(ValueError, match="min_reps <= max_reps"):
        bench(lambda: None, min_reps=10, max_reps=5, device="cpu")


def test_bad_dtype() -> None:
    with pytest.raises(ValueError, match="unknown dtype"):
        bench(lambda: None, flops=1, dtype="float13", device="cpu")


def test_fn_that_raises_is_wrapped() -> None:
    def broken() -> None:
        raise KeyError("missing weight")

    with pytest.raises(BenchError, match=r"benchmark 'loader': fn raised during warm-up: KeyError") as info:
        bench(broken, name="loader", device="cpu")
    assert isinstance(info.value.__cause__, KeyError)


def test_fn_that_raises_later_is_wrapped() -> None:
    state = {"calls": 0}

    def flaky() -> None:
        state["calls"] += 1
        if state["calls"] > 3:
            raise RuntimeError("ran out of data")

    with pytest.raises(BenchError, match="raised during (warm-up|timing): RuntimeError: ran out of data"):
        bench(flaky, device="cpu", warmup_ms=0, rep_ms=0, min_reps=10)


@no_cuda
def test_cuda_requested_without_gpu() -> None:
    with pytest.raises(
        NoGPUError, match=r"device='cuda' was requested, but no CUDA GPU is available.*device='cpu'"
    ):
        bench(lambda: None, device="cuda")


@no_cuda
def test_fn_touching_cuda_without_gpu() -> None:
    with pytest.raises(BenchError, match="raised during warm-up") as info:
        bench(lambda: torch.zeros(1, device="cuda"), name="on gpu")
    msg = str(info.value)
    assert "'on gpu'" in msg and "no CUDA GPU is available" in msg and "default_device()" in msg
    assert info.value.__cause__ is not None


@no_cuda
def test_week1_quotes_the_committed_timer_validation() -> None:
    """week01_intro/README.md's two comparisons are the ones in the committed H100 run, to the digits quoted."""
    record = json.loads(
        (REPO_ROOT / "benchmarks/results/nvidia-h100-80gb-hbm3/bench_timer_validation.json").read_text()
    )
    readme = (REPO_ROOT / "week01_intro/README.md").read_text()
    stream, graph = record["checks"]
    assert stream["name"].startswith("fp32 y = x + 1") and record["all_within_tolerance"]
    assert (
        f"{stream['ours_ms']:.4f} ms vs `triton.testing.do_bench` {stream['reference_ms']:.4f} ms" in readme
    )
    assert f"({stream['rel_diff']:+.1%})".replace("-", "−") in readme
    assert (
        f"{graph['ours_ms'] * 1e3:.3f} µs vs `do_bench_cudagraph` {graph['reference_ms'] * 1e3:.3f} µs"
        in readme
    )
    assert f"({graph['rel_diff']:+.1%})".replace("-", "−") in readme


def test_timer_validation_needs_a_gpu(tmp_path: Path) -> None:
    from common.bench_validation import run_timer_validation

    with pytest.raises(NoGPUError, match="CUDA GPU"):
        run_timer_validation(tmp_path)
    assert not (tmp_path / "bench_timer_validation.json").exists()


def test_public_api_is_exported() -> None:
    for name in bench_module.__all__:
        assert hasattr(bench_module, name)
