"""common.bench on a CUDA GPU: cache modes, graph mode, throughput, memory, errors, agreement with Triton.

Every check compares two measurements made in the same process (or a measurement with the datasheet),
with generous margins, so the tests hold on any recent NVIDIA GPU, not just the one they were written on.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from common.bench import BenchError, bench, compare
from common.hardware import UnknownGPUError, default_device, gpu_spec

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

pytestmark = pytest.mark.gpu
MiB = 2**20
REPO_ROOT = Path(__file__).resolve().parents[1]


@triton.jit
def _strided_sum_kernel(x_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    # Few programs, each walking its share of x one block at a time: the kernel is bound by memory
    # latency, so it runs long enough (~100 µs) that launch overhead can't hide the L2-vs-DRAM gap.
    pid = tl.program_id(0)
    stride = tl.num_programs(0) * BLOCK
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_elements, stride):
        idx = start + offsets
        acc += tl.load(x_ptr + idx, mask=idx < n_elements, other=0.0)
    tl.store(out_ptr + offsets, acc)


def test_cold_cache_is_slower_than_warm_for_l2_resident_data() -> None:
    device = default_device()
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    # A quarter of L2: stays resident when warm even where L2 is split in two partitions (A100, H100).
    x = torch.randn(l2 // 4 // 4, device=device)
    programs, block = 8, 1024
    out = torch.empty(programs * block, device=device)

    def read_x() -> None:
        _strided_sum_kernel[(programs,)](x, out, x.numel(), BLOCK=block)

    cold = bench(read_x, name="read x, cold", cache="cold")
    warm = bench(read_x, name="read x, warm", cache="warm")
    assert (cold.cache, warm.cache) == ("cold", "warm") and cold.timer == "cuda_event"
    assert warm.median_ms < 0.8 * cold.median_ms, f"warm L2 should be faster:\n{cold}\n{warm}"


def test_flush_is_not_timed() -> None:
    device = default_device()
    x = torch.zeros(1, device=device)
    tiny = bench(lambda: x.add_(1), name="tiny add, cold", cache="cold")
    # What one flush costs on this GPU: writing 256 MiB (the flush is at least that large).
    buf = torch.empty(256 * MiB // 4, dtype=torch.int32, device=device)
    flush = bench(buf.zero_, name="256 MiB memset", cache="warm")
    assert tiny.median_ms < 0.5 * flush.median_ms, f"the flush leaked into the timing:\n{tiny}\n{flush}"


def test_graph_mode_removes_launch_overhead() -> None:
    x = torch.zeros(16, device=default_device())

    def chain() -> None:  # 50 tiny kernels: in eager mode the GPU waits for the CPU to launch each
        for _ in range(50):
            x.add_(1)

    eager = bench(chain, name="eager chain", cache="warm")
    graph = bench(chain, name="graphed chain", cuda_graph=True)
    assert graph.timer == "cuda_graph" and graph.cache == "warm"  # graph mode defaults to warm
    assert graph.env["graph_unroll"] >= 1
    assert graph.median_ms < 0.75 * eager.median_ms, (
        f"graph replay should beat eager launches:\n{eager}\n{graph}"
    )


def test_no_host_sync_per_repetition(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(1024, device=default_device())
    syncs = {"n": 0}
    real_sync = torch.cuda.synchronize

    def counting_sync(device: object = None) -> None:
        syncs["n"] += 1
        real_sync(device)

    monkeypatch.setattr(torch.cuda, "synchronize", counting_sync)
    counts = []
    for reps in (10, 200):
        syncs["n"] = 0
        r = bench(lambda: x.add_(1), warmup_ms=0, rep_ms=0, min_reps=reps, max_reps=reps)
        assert r.n == reps
        counts.append(syncs["n"])
    assert counts[0] == counts[1], f"syncs grew with the number of repetitions: {counts}"


def test_bf16_matmul_reaches_a_plausible_fraction_of_peak() -> None:
    try:
        spec = gpu_spec()
    except UnknownGPUError as err:
        pytest.skip(str(err))
    device = default_device()
    n = 4096
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    r = bench(lambda: a @ b, name=f"matmul bf16 {n}³", flops=2 * n**3, dtype=torch.bfloat16)
    assert r.env["spec"] == spec.name and r.dtype == "bf16"
    assert r.frac_peak_flops is not None and 0.3 < r.frac_peak_flops < 1.05, str(r)
    assert "TFLOP/s" in str(r) and "% of peak" in str(r)
    assert r.env["gpu"] == torch.cuda.get_device_name(device)


def test_compare_bf16_against_fp32_matmul() -> None:
    device = default_device()
    n = 2048
    a32, b32 = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # true fp32 on CUDA cores, not TF32
    try:
        c = compare(lambda: a32 @ b32, lambda: a16 @ b16, names=("fp32", "bf16"), flops=2 * n**3)
    finally:
        torch.set_float32_matmul_precision(precision)
    assert c.speedup > 2, str(c)  # tensor cores: ~10x on A100/H100
    assert c.baseline.n == c.candidate.n == len(c.ratios)


def test_peak_memory_is_reported() -> None:
    device = default_device()

    def allocate() -> torch.Tensor:
        return torch.ones(64 * MiB // 4, device=device)  # 64 MiB, freed when dropped

    r = bench(allocate, name="64 MiB alloc")
    assert r.peak_memory_bytes is not None
    # At least the tensor; well below the 256 MiB L2-flush buffer, which must not be counted.
    assert 64 * MiB <= r.peak_memory_bytes < 96 * MiB, r.peak_memory_bytes


def test_peak_memory_leaves_out_the_first_call() -> None:
    """A first call that holds extra memory for a while (as Triton's autotuner does, timing each config
    with its own 256 MB buffer) does not count: the peak is what every later call needs."""
    device = default_device()
    calls = 0

    def first_call_tunes() -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:
            torch.ones(256 * MiB // 4, device=device).sum()  # a tuning-sized transient, freed at once
        return torch.ones(16 * MiB // 4, device=device)

    r = bench(first_call_tunes, name="tunes at its first call")
    assert calls > 2 and r.peak_memory_bytes is not None
    assert 16 * MiB <= r.peak_memory_bytes < 64 * MiB, r.peak_memory_bytes


def test_bandwidth_fractions() -> None:
    device = default_device()
    x = torch.randn(64 * MiB // 4, device=device)
    y = torch.empty_like(x)
    r = bench(lambda: y.copy_(x), name="copy 64 MiB", bytes=2 * x.nbytes)
    assert r.frac_measured_bw is not None and 0.2 < r.frac_measured_bw < 1.5, str(r)
    if r.env["spec"] is not None:
        assert r.frac_peak_bw is not None and 0.1 < r.frac_peak_bw < 1.05, str(r)


def test_cuda_fn_that_raises_gives_a_clear_error() -> None:
    device = default_device()
    a, b = torch.ones(3, 4, device=device), torch.ones(5, 6, device=device)
    with pytest.raises(BenchError, match=r"benchmark 'bad matmul': fn raised during warm-up") as info:
        bench(lambda: a @ b, name="bad matmul")
    assert isinstance(info.value.__cause__, RuntimeError)
    assert bench(lambda: a.add_(1), cache="warm", warmup_ms=1, rep_ms=1).n >= 1  # the GPU is still usable


@pytest.mark.slow
def test_timer_agrees_with_triton(tmp_path: Path) -> None:
    from common.bench_validation import run_timer_validation

    report = run_timer_validation(tmp_path, rounds=7)
    saved = json.loads((tmp_path / "bench_timer_validation.json").read_text())
    assert report["path"] == str(tmp_path / "bench_timer_validation.json")
    assert saved == {key: value for key, value in report.items() if key != "path"}
    large, small = report["checks"]
    assert large["kernel_over_100us"] and small["kernel_under_20us"], report["checks"]
    for check in report["checks"]:
        assert check["within_tolerance"], (
            f"{check['name']}: ours {check['ours_ms']:.4f} ms vs {check['reference']} "
            f"{check['reference_ms']:.4f} ms ({check['rel_diff']:+.1%}); "
            f"runs {check['ours_runs_ms']} vs {check['reference_runs_ms']}"
        )


def test_graph_capture_failure_is_explained() -> None:
    # Runs in a child process: a capture that fails half-way leaves PyTorch's CUDA random-number generator
    # registered with the dead graph, and every later random op in that process raises "Offset increment
    # outside graph capture encountered unexpectedly". The rest of the GPU suite must not inherit that.
    code = textwrap.dedent(
        """
        import torch
        from common.bench import BenchError, bench
        from common.hardware import default_device

        x = torch.ones(8, device=default_device())
        try:
            bench(lambda: x.sum().item(), name="syncs", cuda_graph=True, warmup_ms=1, rep_ms=1)
        except BenchError as error:
            print("BenchError:", error)
        else:
            print("no error")
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT
    )
    assert child.returncode == 0, child.stderr
    assert re.search(
        r"(?s)^BenchError: .*raised during CUDA graph capture.*cuda_graph=False", child.stdout
    ), child.stdout + child.stderr


def test_host_time_separates_issuing_work_from_doing_it() -> None:
    """An 8192^3 bf16 matmul keeps the GPU busy for ~1 ms; issuing it costs the host tens of µs. Measured
    behind a sleeping kernel, the host time must be far below the GPU time, not equal to it."""
    from common.bench import host_time_us

    a = torch.randn(8192, 8192, device=default_device(), dtype=torch.bfloat16)
    gpu_ms = bench(lambda: a @ a).median_ms
    assert host_time_us(lambda: a @ a, calls=50) < 0.1 * gpu_ms * 1e3


def test_host_time_refuses_a_function_that_waits_for_the_gpu() -> None:
    from common.bench import host_time_us

    x = torch.ones(1024, device=default_device())
    with pytest.raises(BenchError, match="waits for the GPU"):
        host_time_us(lambda: x.sum().item(), calls=5)
