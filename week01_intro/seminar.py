# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Week 1 seminar: what the GPU is doing, and how to time it honestly
#
# Every later week of this course makes some piece of deep-learning code faster. Before we can do that we need
# three things: to know what the hardware can do at best, to measure what our code actually does, and to
# understand the ways a measurement can lie. This seminar covers all three, in nine parts:
#
# 1. **The hardware**: what PyTorch reports about the device, and the datasheet peaks we compare against.
# 2. **Asynchronous execution**: why `time.perf_counter()` around a CUDA call measures almost nothing, and
#    what a launch costs the host.
# 3. **The caching allocator**: `memory_allocated` versus `memory_reserved`, and fragmentation.
# 4. **CPU micro-benchmarks**: `timeit` versus `torch.utils.benchmark`, and what threads buy.
# 5. **Throughput against the peaks**: fp32, TF32, bf16 and fp16 matmuls; clocks and power; the roofline;
#    the MFU of a training step.
# 6. **Memory-bound kernels**: coalesced versus strided access, and a first Triton kernel.
# 7. **Streams**: overlapping host-to-device copies with compute.
# 8. **Launch overhead and fusion**: CUDA graphs for many tiny kernels, `torch.compile` for a chain of
#    elementwise ops.
# 9. **Numerics and debugging**: why the same sum gives different answers, and why CUDA errors point at the
#    wrong line.
#
# All timings go through `common.bench`, the course's one timing function (CUDA events, warm-up, L2 flush,
# median with spread), and all peaks come from `common.hardware`. Each part measures something, shows it as a
# plot or a table, and checks what it claims with an `assert`, so running the notebook is also a test.
#
# Without a GPU the notebook runs with small sizes on the CPU; the GPU-only parts print that they were
# skipped. The committed `seminar.ipynb` shows the outputs of a full-size run on a data-centre GPU; the first
# table of part 1 names it.

# %% tags=["parameters"]
import os

import torch

# SMALL: small sizes for a laptop/CI CPU. `effdl seminar --small/--full` and CI set EFFDL_SMALL; default: full on a GPU.
SMALL = os.environ.get("EFFDL_SMALL", "0" if torch.cuda.is_available() else "1") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# %%
import dataclasses
import logging
import re
import subprocess
import sys
import textwrap
import time
import timeit
from functools import partial

import matplotlib.pyplot as plt
import numpy as np

# Importing torch.utils.benchmark warns about CUDA_HOME on machines without CUDA; the warning is harmless.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
import torch.utils.benchmark as torch_benchmark
from torch.utils.flop_counter import FlopCounterMode

from common import hardware
from common.bench import bench, measured_copy_bandwidth
from common.environment import environment
from common.kernels.vector_add import vector_add  # without a GPU this switches on Triton's interpreter
from common.models.transformer import TransformerBlock, block_flops
from common.profiling import profile_steps, top_ops
from common.tables import show_table

torch.manual_seed(0)
MiB, GiB = 2**20, 2**30
RESULTS: dict[str, str] = {}  # one line per key result (at most 12); the summary cell at the end prints them


def sync():
    """Wait until the GPU has finished everything queued so far (a no-op on the CPU)."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()


print(f"device: {DEVICE}, sizes: {'small' if SMALL else 'full'}, torch {torch.__version__}")

# %% [markdown]
# ## 1. What hardware are we on?
#
# A GPU is an array of *streaming multiprocessors* (SMs), each with its own registers, shared memory and
# tensor cores, all sharing an L2 cache and the off-chip HBM. PyTorch reports the basic facts:

# %%
SPEC = None  # the datasheet numbers of this GPU, if common.hardware knows it
if DEVICE == "cuda":
    props = torch.cuda.get_device_properties(DEVICE)
    rows = [
        ("name", props.name),
        ("compute capability", f"sm_{props.major}{props.minor}"),
        ("SMs", props.multi_processor_count),
        ("memory", f"{props.total_memory / GiB:.1f} GiB"),
        ("L2 cache", f"{props.L2_cache_size / MiB:.0f} MiB"),
    ]
    # HBM transfers on both clock edges: bandwidth = 2 x memory clock x bus width.
    hbm_bandwidth = 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8
    if hbm_bandwidth > 0:
        rows.append(("memory bandwidth (from clock x bus)", f"{hbm_bandwidth / 1e12:.2f} TB/s"))
    show_table(["property", "value"], rows)
    try:
        SPEC = hardware.gpu_spec()
    except hardware.UnknownGPUError as error:
        print(f"\nNo datasheet peaks for this GPU, so no fractions of peak below: {error}")
    if SPEC is not None:
        assert SPEC.sm_count == props.multi_processor_count, (
            f"spec {SPEC.name!r} says {SPEC.sm_count} SMs, the device has {props.multi_processor_count}: "
            "the GPU was matched to the wrong entry of common.hardware.SPECS"
        )
        if hbm_bandwidth > 0:
            assert abs(hbm_bandwidth / SPEC.mem_bandwidth - 1) < 0.2, (hbm_bandwidth, SPEC.mem_bandwidth)
    RESULTS["device"] = f"{props.name}: {props.multi_processor_count} SMs, {props.total_memory / GiB:.0f} GiB"
else:
    print(
        f"No CUDA GPU: running on the CPU ({os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads)."
    )
    RESULTS["device"] = f"CPU, {torch.get_num_threads()} threads (GPU-only parts skipped)"

# %% [markdown]
# What the device *could* do is on its datasheet. `common.hardware.SPECS` holds the dense peaks (no 2:4
# sparsity) of the GPUs this course runs on. Two things stand out. First, on the data-centre GPUs (A100, H100,
# H200) the tensor-core dtypes (TF32, bf16, fp16, fp8) are 7-30x faster than plain fp32. Second, compute has
# grown much faster than memory bandwidth: the *ridge point*, peak FLOP/s divided by bandwidth, says how many
# FLOPs a kernel must do per byte it moves before memory stops being the bottleneck. For bf16 on an H100 it is
# about 300.

# %%
header = ["GPU", "fp32", "tf32", "bf16", "fp8", "HBM TB/s", "GiB", "L2 MiB", "SMs", "ridge FLOP/B"]
rows = []
for spec in hardware.SPECS.values():
    peak = {k: f"{spec.peak_flops[k] / 1e12:.0f}" if k in spec.peak_flops else "-" for k in hardware.DTYPES}
    half = "bf16" if "bf16" in spec.peak_flops else "fp16"  # T4: fp16 tensor cores only
    ridge = hardware.ridge_point(spec, half)
    assert ridge > 100, f"{spec.name}: {half} ridge point {ridge:.0f} FLOP/B"
    marker = " *" if SPEC is not None and spec.name == SPEC.name else ""
    rows.append(
        (
            spec.name + marker,
            peak["fp32"],
            peak["tf32"],
            peak["bf16"],
            peak["fp8"],
            f"{spec.mem_bandwidth / 1e12:.2f}",
            spec.memory_bytes // GiB,
            spec.l2_bytes // MiB,
            spec.sm_count,
            f"{ridge:.0f} ({half})",
        )
    )
show_table(header, rows)
print("\nPeaks in dense TFLOP/s." + (" * marks this GPU." if SPEC is not None else ""))

# %% [markdown]
# The assert above is the first lesson of the course in one line: on every one of these GPUs, a kernel has to
# do more than 100 FLOPs per byte of memory traffic to keep the tensor cores busy. Most operations in a neural
# network (elementwise ops, normalisations, attention at small batch) do far fewer.
#
# Now the tool we will use for every measurement. `bench(fn, ...)` warms `fn` up, times repetitions with CUDA
# events (on the CPU with `time.perf_counter`), flushes L2 between repetitions (`cache="cold"`), and returns
# a `BenchResult`: the times, their statistics, throughput from the FLOPs and bytes we tell it, fractions of
# the peak, and the environment the number was measured in.

# %%
n = 256 if DEVICE == "cpu" else 4096
a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
result = bench(partial(torch.matmul, a, b), name=f"matmul fp32 {n}^3", flops=2 * n**3, dtype=torch.float32)
print(result, "\n")

fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
fields["times_ms"] = (
    f"[{len(result.times_ms)} values: {result.times_ms[0]:.4g}, {result.times_ms[1]:.4g}, ...]"
)
fields["env"] = f"{{{len(result.env)} keys, below}}"
show_table(["field", "value"], [(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in fields.items()])
print()
show_table(["env key", "value"], [(k, v) for k, v in result.env.items() if k != "notes"])
for note in result.env.get("notes", []):
    print("note:", note)

assert result.n == len(result.times_ms) >= 10
assert result.min_ms <= result.p20_ms <= result.median_ms <= result.p80_ms
assert result.timer == ("cuda_event" if DEVICE == "cuda" else "perf_counter")
# tflops is counted at the median time
assert abs(result.tflops - 2 * n**3 / (result.median_ms * 1e-3) / 1e12) < 1e-6 * result.tflops

# %% [markdown]
# ## 2. The GPU runs asynchronously: timing without synchronisation lies
#
# A CUDA call in PyTorch does not run the kernel: it *enqueues* it on a stream and returns to Python at once,
# while the GPU works through the queue in the background. That is what lets Python, slow as it is, keep a GPU
# busy. It also means that `time.perf_counter()` around `a @ b` measures how long it took to *launch* the
# matmul, not to run it.
#
# We time the same matmul four ways:
#
# - **perf_counter, no sync**: the common mistake;
# - **perf_counter + `torch.cuda.synchronize()`** before and after: correct, but adds the latency of a
#   host-device round trip and of the launch to every measurement;
# - **CUDA events**: two timestamps recorded *on the GPU's stream*, read after a sync;
# - **`common.bench`**: CUDA events plus warm-up, many repetitions and a median.
#
# On a CPU every PyTorch op is synchronous (it returns when the work is done), so the first two are the same
# thing and there are no CUDA events; we still run the CPU version to compare with `bench`.

# %%
n = 256 if DEVICE == "cpu" else (4096 if SMALL else 8192)
a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
for _ in range(3):  # warm-up: cuBLAS picks its kernel, the allocator caches the output block
    a @ b
sync()

REPS = 10
times = {"perf_counter, no sync": [], "perf_counter + sync": [], "CUDA events": []}
for _ in range(REPS):
    t0 = time.perf_counter()
    a @ b
    times["perf_counter, no sync"].append((time.perf_counter() - t0) * 1e3)
    sync()  # not part of the measurement: only so that the next one starts with an idle GPU
for _ in range(REPS):
    sync()
    t0 = time.perf_counter()
    a @ b
    sync()
    times["perf_counter + sync"].append((time.perf_counter() - t0) * 1e3)
if DEVICE == "cuda":
    for _ in range(REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()  # enqueued on the current stream, like the matmul
        a @ b
        end.record()
        end.synchronize()  # wait until the GPU has passed the end event
        times["CUDA events"].append(start.elapsed_time(end))  # ms, measured by the GPU
else:
    del times["CUDA events"]
medians = {method: float(np.median(t)) for method, t in times.items()}
medians["common.bench"] = bench(partial(torch.matmul, a, b), name="matmul").median_ms

show_table(["method", "median ms"], [(k, f"{v:.4f}") for k, v in medians.items()])
fig, ax = plt.subplots(figsize=(7, 3))
ax.barh(list(medians), list(medians.values()), color=["C3"] + ["C0"] * (len(medians) - 1))
if DEVICE == "cuda":
    ax.set_xscale("log")  # the four numbers span three orders of magnitude
ax.set_xlabel(f"measured time of one matmul (ms{', log scale' if DEVICE == 'cuda' else ''})")
ax.set_title(f"fp32 matmul {n}x{n} on {DEVICE}: the same work, timed {len(medians)} ways")
ax.invert_yaxis()
plt.tight_layout()
plt.show()

ratio = medians["common.bench"] / medians["perf_counter, no sync"]
if DEVICE == "cuda":
    assert medians["perf_counter, no sync"] < medians["perf_counter + sync"] / 10, medians
    assert 0.7 < medians["CUDA events"] / medians["common.bench"] < 1.3, medians
    RESULTS["no-sync timing"] = f"perf_counter without sync under-reports a {n}^2 matmul {ratio:.0f}x"
else:
    # On the CPU the op is done when it returns: both perf_counter timings measure the work. No assert here: on
    # a shared CPU (a laptop, a CI runner) another process can stall any repetition by a scheduler time slice.
    RESULTS["no-sync timing"] = (
        f"CPU ops are synchronous: no-sync and bench agree within {max(ratio, 1 / ratio):.1f}x"
    )

# %% [markdown]
# Without a sync we measured the launch: a small fraction of the matmul's run time (the assert above checks
# less than a tenth). The work did not vanish, though. It shows up at the next line that needs the result on
# the host (`.item()`, `.cpu()`, `print(tensor)`, a Python `if` on a tensor), which then waits for the GPU. Profiles of real training loops
# are full of such "slow" `.item()` calls that are really someone else's kernels.

# %%
if DEVICE == "cuda":
    sync()
    t0 = time.perf_counter()
    c = a @ b
    t1 = time.perf_counter()
    c[0, 0].item()  # note: a host-device sync
    t2 = time.perf_counter()
    print(
        f"c = a @ b returned after {(t1 - t0) * 1e3:.3f} ms; c[0, 0].item() then took {(t2 - t1) * 1e3:.3f} ms"
    )
    assert t2 - t1 > t1 - t0
else:
    print("Skipped on CPU: a CPU op returns when its work is done, so there is nothing left to wait for.")

# %% [markdown]
# ### What does a launch cost the host?
#
# The launch of the big matmul was cheap next to its run time, but it was not free: the first row of the table
# above is the host's time for one call. Compare it with the few microseconds that launching a bare kernel
# takes. What does the host do during a launch? There are three candidates:
#
# - **work done on every call, before the kernel is queued**: Python, PyTorch's dispatcher, allocating the
#   output from the cache, and for a matmul cuBLAS's host side: choosing a kernel for this shape and dtype
#   and setting up its arguments;
# - **one-time work on a first call**: the cuBLAS handle and its workspace, kernel choice for a new shape, and
#   loading the kernel's code onto the GPU (CUDA loads kernels lazily, on first use);
# - **a full launch queue**: a stream holds a limited number of pending launches, and a launch into a full
#   queue blocks until the GPU frees a slot. That cannot be the case above, where every call started with an
#   idle GPU, but it is what a loop that runs far ahead of the GPU eventually hits.
#
# The next cell separates the first two. It times the host side of four launches, each from an idle GPU: a
# tiny elementwise kernel, a small matmul, the big fp32 matmul, and the same matmul in fp16, a kernel this
# process has not launched yet. For each: the first call, the median of later calls, and what the kernel
# costs the GPU (`bench(cuda_graph=True)`, which removes the launch). Then the profiler breaks one later call
# of the big matmul into the host functions it spent its time in.

# %%
if DEVICE == "cuda":

    def host_ms(fn, reps=20):
        """Host time of fn(), each call from an idle GPU: (first call, median of the later calls), in ms."""
        times = []
        for _ in range(reps + 1):
            sync()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        sync()
        return times[0], float(np.median(times[1:]))

    tiny, small = torch.randn(1024, device=DEVICE), torch.randn(256, 256, device=DEVICE)
    a16, b16 = a.half(), b.half()
    launches = {
        "tiny elementwise (x.sigmoid(), 1024 floats)": partial(torch.sigmoid, tiny),
        "fp32 matmul 256^2": partial(torch.matmul, small, small),
        f"fp32 matmul {n}^2 (warmed up above)": partial(torch.matmul, a, b),
        f"fp16 matmul {n}^2 (first fp16 matmul)": partial(torch.matmul, a16, b16),
    }
    launch_rows, launch_cost = [], {}
    for name, fn in launches.items():
        first, later = host_ms(fn)
        gpu = bench(fn, name=name, cuda_graph=True).median_ms
        launch_cost[name] = (first, later, gpu)
        launch_rows.append((name, f"{first:.3f}", f"{later:.3f}", f"{gpu:.3f}"))
    show_table(["launch of", "first call ms", "later calls ms", "GPU time ms"], launch_rows)

    # One later call of the big matmul, split into host functions by the profiler (sync() is not timed here).
    prof = profile_steps(lambda: (sync(), a @ b), wait=1, warmup=1, active=5)
    host_rows = [
        (op.name, op.calls // 5, f"{op.self_cpu_ms / 5 * 1e3:.1f}")
        for op in top_ops(prof, k=12, by="cpu")
        if "Synchronize" not in op.name and "Activity Buffer" not in op.name  # the sync; the profiler's own
    ][:6]
    print(f"\nWhere one launch of the {n}^2 fp32 matmul spends its host time (self time, per call):")
    show_table(["host function", "calls", "us"], host_rows)

    tiny_first, tiny_later, tiny_gpu = launch_cost["tiny elementwise (x.sigmoid(), 1024 floats)"]
    _, big_later, big_gpu = launch_cost[f"fp32 matmul {n}^2 (warmed up above)"]
    fp16_first, fp16_later, _ = launch_cost[f"fp16 matmul {n}^2 (first fp16 matmul)"]
    assert big_later < big_gpu / 5, "a launch returns long before a big kernel is done"
    assert tiny_later > tiny_gpu, "a tiny kernel costs the host more to launch than the GPU to run"
    assert fp16_first > fp16_later, "a first call does one-time work: kernel choice, loading the kernel"
else:
    print(
        "Skipped on CPU: a CPU op does its work inside the call, so there is no launch to separate from it."
    )

# %% [markdown]
# Read the table row by row. A tiny kernel costs the host more to launch than it costs the GPU to run (the
# assert checks it): that is the launch-bound regime of part 8. The first fp16 matmul costs more than its
# later calls (checked too): one-time work that a warm-up keeps out of a measurement. The later calls of the
# matmuls are the per-call host cost of a matmul on this machine; compare the two fp32 rows to see whether it
# grows with the size, and the profiler's rows to see where it goes: `aten::mm`'s own time is PyTorch's and
# cuBLAS's host code (cuBLAS picks and prepares its kernel inside it), the `cuda...`/`cu...` rows are calls
# into the CUDA runtime and driver, such as the launch itself.

# %% [markdown]
# ## 3. The caching allocator: allocated versus reserved memory
#
# `cudaMalloc` and `cudaFree` are slow (`cudaFree` synchronises the device), so PyTorch doesn't call them per
# tensor.
# Its *caching allocator* asks CUDA for large segments and hands out blocks from them; a freed tensor's block
# goes back to the cache, not to CUDA. Two numbers follow from that:
#
# - `torch.cuda.memory_allocated()`: bytes in live tensors;
# - `torch.cuda.memory_reserved()`: bytes the allocator holds from CUDA (live tensors + cached free blocks),
#   which is why a process's memory "never goes down".
#
# `nvidia-smi` shows more than `memory_reserved`: the CUDA context, the code of the kernels loaded so far
# (CUDA loads them lazily, on first use) and, in distributed jobs, NCCL's buffers. cuBLAS and cuDNN
# workspaces are *not* part of that difference: PyTorch allocates them through the caching allocator, so
# they are counted in `memory_reserved`.
#
# Blocks from different segments cannot be merged. Allocate many blocks, free every other one, and the
# free memory is full of holes: a tensor larger than any hole needs a new segment although the total free
# memory would hold it. That is *fragmentation*. `torch.cuda.empty_cache()` returns whole free segments to
# CUDA (useful for other processes, not for speed), and `PYTORCH_ALLOC_CONF=expandable_segments:True`
# makes segments growable, which reduces fragmentation. (`PYTORCH_ALLOC_CONF` is the current name of the
# allocator's settings; the older `PYTORCH_CUDA_ALLOC_CONF` is still accepted.)

# %%
if DEVICE == "cuda":
    del a, b, c, a16, b16  # the big matrices of part 2: start from a clean cache
    sync()
    torch.cuda.empty_cache()
    base_allocated, base_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    trace = []  # (step, allocated MiB, reserved MiB), relative to the start

    def mark(step):
        allocated = torch.cuda.memory_allocated() - base_allocated
        reserved = torch.cuda.memory_reserved() - base_reserved
        trace.append((step, allocated / MiB, reserved / MiB))

    BLOCK = 64 * MiB
    mark("start")
    blocks = []
    for i in range(8):
        blocks.append(torch.empty(BLOCK, dtype=torch.uint8, device=DEVICE))
        mark(f"alloc {i + 1}")
    reserved_full = torch.cuda.memory_reserved()
    del blocks
    mark("free all")
    assert torch.cuda.memory_allocated() == base_allocated
    assert torch.cuda.memory_reserved() == reserved_full, "freed blocks stay in the cache"
    x = torch.empty(BLOCK, dtype=torch.uint8, device=DEVICE)
    mark("alloc again")
    assert torch.cuda.memory_reserved() == reserved_full, "served from the cache: no new cudaMalloc"
    del x
    torch.cuda.empty_cache()
    mark("empty_cache")
    assert torch.cuda.memory_reserved() <= base_reserved, "empty_cache returned the free segments"

    # Fragmentation: eight 64 MiB blocks, every other one freed, then one 128 MiB tensor.
    blocks = [torch.empty(BLOCK, dtype=torch.uint8, device=DEVICE) for _ in range(8)]
    mark("8 blocks")
    for i in range(0, 8, 2):
        blocks[i] = None
    mark("free every other")
    cached_free = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    reserved_before = torch.cuda.memory_reserved()
    big = torch.empty(2 * BLOCK, dtype=torch.uint8, device=DEVICE)
    mark("alloc 128 MiB")
    grew = torch.cuda.memory_reserved() - reserved_before
    assert cached_free >= 2 * BLOCK, "the cache holds enough free memory in total..."
    assert grew >= 2 * BLOCK, "...but in 64 MiB holes, so the 128 MiB tensor needed a new segment"
    del big, blocks
    torch.cuda.empty_cache()
    mark("empty_cache")

    steps, allocated, reserved = zip(*trace, strict=True)
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.step(range(len(steps)), reserved, where="mid", label="memory_reserved", color="C1", linewidth=2)
    ax.step(range(len(steps)), allocated, where="mid", label="memory_allocated", color="C0", linewidth=2)
    ax.fill_between(
        range(len(steps)), allocated, reserved, step="mid", color="C1", alpha=0.2, label="cached, free"
    )
    ax.set_xticks(range(len(steps)), steps, rotation=45, ha="right")
    ax.set_ylabel("MiB (relative to start)")
    ax.set_title("Caching allocator: 64 MiB blocks allocated and freed")
    ax.legend(loc="upper left")
    plt.tight_layout()
    plt.show()
    print(
        f"{cached_free / MiB:.0f} MiB cached and free, "
        f"yet a 128 MiB tensor grew reserved memory by {grew / MiB:.0f} MiB"
    )

    # What the driver sees in use on the device (nvidia-smi's number, plus any other process's) against what
    # PyTorch's allocator holds: the difference is the CUDA context, loaded kernels, and other processes.
    free, total = torch.cuda.mem_get_info()
    in_use, reserved = total - free, torch.cuda.memory_reserved()
    print(
        f"device memory in use: {in_use / MiB:.0f} MiB; reserved by the caching allocator: {reserved / MiB:.0f} MiB; "
        f"the rest (CUDA context, kernel code, other processes): {(in_use - reserved) / MiB:.0f} MiB"
    )
    assert in_use > reserved, "the device holds more than the caching allocator: at least the CUDA context"
else:
    print("Skipped on CPU: the caching allocator manages GPU memory (CPU tensors use the system allocator).")

# %% [markdown]
# ## 4. CPU micro-benchmarks: `timeit` versus `torch.utils.benchmark`
#
# Python's `timeit` runs a statement many times and reports the total; it knows nothing about PyTorch.
# `torch.utils.benchmark.Timer` is built for tensors: it warms up, picks the number of runs itself
# (`blocked_autorange`), reports the median and interquartile range, synchronises CUDA when the statement
# uses the GPU, and **pins the number of threads, to one by default**, so that numbers are comparable across
# machines. That default surprises people: a matmul timed with `Timer` is single-threaded unless you pass
# `num_threads`. (`common.bench` leaves threads as they are and warms up by time; on the GPU it also flushes
# L2.)

# %%
n = 256 if SMALL else 1024
x_cpu, y_cpu = torch.randn(n, n), torch.randn(n, n)
threads = torch.get_num_threads()

number = 20 if SMALL else 5
t_timeit = min(timeit.repeat(lambda: x_cpu @ y_cpu, number=number, repeat=5)) / number * 1e3
timer_1 = torch_benchmark.Timer("x @ y", globals={"x": x_cpu, "y": y_cpu}, label=f"matmul {n}^3")
m_1 = timer_1.blocked_autorange(min_run_time=0.2)
timer_n = torch_benchmark.Timer("x @ y", globals={"x": x_cpu, "y": y_cpu}, num_threads=threads)
m_n = timer_n.blocked_autorange(min_run_time=0.2)
show_table(
    ["tool", "threads", "median ms", "spread", "measurements"],
    [
        ("timeit (best of 5 repeats)", threads, f"{t_timeit:.3f}", "-", "5 totals"),
        *[
            (name, m.task_spec.num_threads, f"{m.median * 1e3:.3f}", f"IQR {m.iqr * 1e3:.3f}", len(m.times))
            for name, m in (("Timer (default)", m_1), (f"Timer(num_threads={threads})", m_n))
        ],
    ],
)
assert m_1.task_spec.num_threads == 1, "Timer runs single-threaded unless told otherwise"
assert torch.get_num_threads() == threads, "Timer restores the thread count it changed"

# %% [markdown]
# How much do threads help? We set the thread count explicitly with `torch.set_num_threads` and time the same
# matmul with `common.bench` (which uses whatever the current setting is). A global setting changed in a
# notebook must be restored afterwards, or every later cell silently runs with it.
#
# On a busy machine, more threads can be much *slower*: a parallel matmul waits for its slowest thread at every
# barrier, and a thread the OS has descheduled in favour of another process costs a whole scheduler time slice
# (milliseconds). Benchmark on an otherwise idle machine, and don't ask for more threads than free cores.

# %%
counts = sorted({k for k in (1, 2, 4, 8, 16, 32) if k <= threads} | {threads})
by_threads = {}
try:
    for k in counts:
        torch.set_num_threads(k)
        by_threads[k] = bench(
            partial(torch.matmul, x_cpu, y_cpu), name=f"{k} threads", flops=2 * n**3, device="cpu"
        )
finally:
    torch.set_num_threads(threads)
assert torch.get_num_threads() == threads

t1 = by_threads[1].median_ms
rows = []
for k, r in by_threads.items():
    rows.append(
        (
            k,
            f"{r.median_ms:.3f}",
            f"{r.tflops * 1e3:.1f}",
            f"{t1 / r.median_ms:.2f}x",
            f"{t1 / r.median_ms / k:.0%}",
        )
    )
show_table(["threads", "ms", "GFLOP/s", "speedup", "efficiency"], rows)
speedup = t1 / by_threads[threads].median_ms
# Checked at full size on 4+ cores only: a small matmul on many threads is mostly threading overhead, and
# on 2 cores (often 2 hyper-threads of one core) the gain can vanish in noise.
if threads >= 4 and not SMALL:
    assert speedup > 1.5, f"a big matmul should scale with cores: {speedup:.2f}x on {threads} threads"
if DEVICE == "cpu":  # on a GPU machine the summary has room for GPU results only
    RESULTS["CPU threads"] = (
        f"CPU matmul {n}^3: {by_threads[1].tflops * 1e3:.0f} GFLOP/s on 1 thread, "
        f"{by_threads[threads].tflops * 1e3:.0f} on {threads} ({speedup:.1f}x)"
    )

# %% [markdown]
# ## 5. Throughput against the peaks: fp32, TF32, bf16 and fp16 matmuls
#
# A matmul of two n x n matrices does 2n^3 FLOPs (a multiply and an add per term) and moves at least 3n^2
# elements, so its arithmetic intensity grows with n: large matmuls are compute-bound and should approach the
# datasheet peak of their dtype. On NVIDIA GPUs since Ampere:
#
# - **fp32** runs on the CUDA cores: the slowest path, ~67 TFLOP/s peak on an H100;
# - **TF32** runs fp32 matmuls on tensor cores with inputs rounded to a 10-bit mantissa. PyTorch leaves it off
#   by default; `torch.set_float32_matmul_precision("high")` turns it on (and must be restored after);
# - **bf16 / fp16** inputs run on tensor cores at twice the TF32 rate, accumulating in fp32.
#
# The speed is paid for in precision, so the table also shows the relative error of each result against a
# float64 matmul of the same inputs.
#
# On a CPU there is no datasheet peak to compare against (it depends on the exact model, cores and vector
# units), so there we run fp32 only and report GFLOP/s without a fraction of peak.

# %%
if DEVICE == "cuda":
    n = 4096 if SMALL else 8192
    a32, b32 = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
    reference = a32.double() @ b32.double()
    configs = [  # (peak key, input dtype, float32 matmul precision)
        ("fp32", torch.float32, "highest"),
        ("tf32", torch.float32, "high"),
        ("bf16", torch.bfloat16, "highest"),
        ("fp16", torch.float16, "highest"),
    ]
    precision = torch.get_float32_matmul_precision()
    matmuls, errors = {}, {}
    try:
        for key, dtype, matmul_precision in configs:
            torch.set_float32_matmul_precision(matmul_precision)
            a_, b_ = a32.to(dtype), b32.to(dtype)
            matmuls[key] = bench(
                partial(torch.matmul, a_, b_), name=f"{key} {n}^3", flops=2 * n**3, dtype=key
            )
            errors[key] = ((a_ @ b_).double() - reference).norm().item() / reference.norm().item()
    finally:
        torch.set_float32_matmul_precision(precision)
    assert torch.get_float32_matmul_precision() == precision
    del reference, a_, b_

    rows = []
    for key, r in matmuls.items():
        peak = SPEC.peak_flops.get(key) if SPEC is not None else None
        frac = f"{r.tflops * 1e12 / peak:.0%}" if peak else "-"
        rows.append(
            (
                key,
                f"{r.median_ms:.3f}",
                f"{r.tflops:.0f}",
                f"{peak / 1e12:.0f}" if peak else "-",
                frac,
                f"{errors[key]:.1e}",
            )
        )
    show_table(["dtype", "ms", "TFLOP/s", "peak", "of peak", "rel. error"], rows)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    keys = list(matmuls)
    ax.bar(keys, [matmuls[k].tflops for k in keys], color="C0", label="measured")
    if SPEC is not None:
        for i, k in enumerate(keys):
            label = "datasheet peak" if i == 0 else None
            ax.hlines(SPEC.peak_flops[k] / 1e12, i - 0.4, i + 0.4, color="C3", linewidth=2, label=label)
    for i, k in enumerate(keys):
        ax.annotate(f"{matmuls[k].tflops:.0f}", (i, matmuls[k].tflops), ha="center", va="bottom")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"Matmul {n}x{n}x{n} on {props.name}")
    ax.legend(loc="upper left")
    plt.tight_layout()
    plt.show()

    assert matmuls["bf16"].tflops > 2 * matmuls["fp32"].tflops, "tensor cores beat fp32 CUDA cores"
    assert errors["fp32"] < errors["tf32"] and errors["fp16"] < errors["bf16"], errors  # fewer mantissa bits
    if SPEC is not None:
        for key, r in matmuls.items():
            assert r.tflops * 1e12 < 1.02 * SPEC.peak_flops[key], f"{key}: faster than the datasheet peak?"
    bf16 = matmuls["bf16"]
    frac = f" ({bf16.frac_peak_flops:.0%} of peak)" if bf16.frac_peak_flops else ""
    RESULTS["bf16 matmul"] = (
        f"bf16 matmul {n}^3: {bf16.tflops:.0f} TFLOP/s{frac}; fp32 without TF32: {matmuls['fp32'].tflops:.0f} TFLOP/s"
    )
else:
    n = 256
    r = bench(partial(torch.matmul, torch.randn(n, n), torch.randn(n, n)), name=f"fp32 {n}^3", flops=2 * n**3)
    print(r)
    print("CPU: fp32 only, and no fraction of peak: common.hardware has no peak for this CPU.")
    RESULTS["fp32 matmul"] = f"CPU fp32 matmul {n}^3: {r.tflops * 1e3:.0f} GFLOP/s"

# %% [markdown]
# ### Clocks and power: why the datasheet peak is out of reach
#
# No dtype above reached its datasheet peak, and none will: a peak is FLOPs per clock per SM x SMs x a
# clock. The H100 SXM's 989.4 TFLOP/s in bf16 is 4096 FLOPs per clock per SM x 132 SMs x 1.83 GHz (the
# course's tests check this arithmetic for the spec table). The clock is not fixed. The GPU raises it up to
# its maximum boost clock while it has power and thermal headroom, and lowers it when the load would draw
# more than its power limit (700 W for an H100 or H200 SXM). Tensor-core matmuls are about the heaviest load
# there is, so under a sustained matmul the SM clock can settle well below the maximum (the course's recorded
# H100 SXM benchmark runs held about 1650 of its 1980 MHz, at 684 W), and the reachable peak falls with it in
# proportion. A fraction of the datasheet peak therefore mixes two things: how good the kernel is,
# and how fast the chip was clocked while it ran.
#
# We keep the GPU busy with bf16 matmuls for a few seconds and ask `nvidia-smi` (through
# `common.environment.environment()`, which every `BenchResult` also records) for the SM clock and the power
# while it works. (`torch.cuda.clock_rate()` and `torch.cuda.power_draw()` read the same counters, but need the
# `pynvml` package, which the course environment does not install.)

# %%
if DEVICE == "cuda":
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    per_matmul_s = matmuls["bf16"].median_ms / 1e3
    batch = max(1, int(0.2 / per_matmul_s))  # ~0.2 s of matmuls queued before each sample
    sync()
    time.sleep(2)  # nvidia-smi averages power over about a second: let the matmuls above fade out of it
    idle = environment()
    samples = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t_end = time.perf_counter() + (2 if SMALL else 5)
    launched = 0
    while time.perf_counter() < t_end:
        for _ in range(batch):
            torch.matmul(a16, b16)
        launched += batch
        samples.append(environment())  # sampled while the GPU works through the queue
    end.record()
    end.synchronize()
    load_tflops = launched * 2 * n**3 / (start.elapsed_time(end) * 1e-3) / 1e12
    loaded = samples[len(samples) // 2 :]  # the second half: the clock has settled

    def median_of(key, envs):
        values = [e[key] for e in envs if isinstance(e.get(key), int | float)]
        return float(np.median(values)) if values else None

    clock = {"idle": median_of("sm_clock_mhz", [idle]), "load": median_of("sm_clock_mhz", loaded)}
    power = {"idle": median_of("power_w", [idle]), "load": median_of("power_w", loaded)}
    max_clock = median_of("max_sm_clock_mhz", [idle])
    show_table(
        ["", "SM clock MHz", "max SM clock MHz", "power W", "temperature C"],
        [
            (
                label,
                f"{clock[key]:.0f}" if clock[key] else "n/a",
                f"{max_clock:.0f}" if max_clock else "n/a",
                f"{power[key]:.0f}" if power[key] else "n/a",
                f"{median_of('temperature_c', envs) or float('nan'):.0f}",
            )
            for label, key, envs in (
                ("idle", "idle", [idle]),
                (f"bf16 matmuls, {len(loaded)} samples", "load", loaded),
            )
        ],
    )
    print(f"bf16 matmul throughput over the whole run: {load_tflops:.0f} TFLOP/s")
    if clock["load"] and max_clock:
        print(
            f"under load the SMs ran at {clock['load'] / max_clock:.0%} of the maximum clock; "
            f"a peak computed at the maximum clock shrinks by the same factor"
        )
        assert clock["load"] <= max_clock, "nvidia-smi's clock never exceeds its maximum"
    if power["idle"] and power["load"]:
        assert power["load"] > power["idle"], f"a matmul load draws more power than idle: {power}"
    if clock["load"] and max_clock and power["load"]:
        RESULTS["clocks"] = (
            f"sustained bf16 matmuls: {load_tflops:.0f} TFLOP/s at {clock['load']:.0f} of {max_clock:.0f} MHz, "
            f"{power['load']:.0f} W"
        )
    del a16, b16
else:
    print("Skipped on CPU: clocks and power are read from the GPU (nvidia-smi).")

# %% [markdown]
# Compare the clock under load with the maximum in the table. When it is lower, the reachable peak is lower
# by the same factor, and a kernel's fraction of the datasheet peak understates how good it is. This is also
# why benchmarks drift: a cool GPU clocks higher for the first seconds, a hot one lower, which is why
# `common.bench` warms up by time and records clocks, power and temperature with every result.

# %% [markdown]
# ### The roofline
#
# The *roofline model* bounds what any kernel can reach: attainable FLOP/s = min(peak FLOP/s, arithmetic
# intensity x memory bandwidth), where intensity is FLOPs per byte of memory traffic. Below the ridge point
# a kernel is memory-bound and only faster memory (or fewer bytes) helps; above it, compute-bound.
#
# We sweep the intensity of one operation: `(n, k) @ (k, n)` with n fixed and k growing 4x per step. It does
# 2n^2 k FLOPs and moves at least 2nk + n^2 elements. For small k, writing the n x n output dominates the
# traffic and the intensity is about 2k / (bytes per element): k FLOP/byte in bf16. For k close to n it is
# thousands of FLOP/byte, far right of the ridge.

# %%
if DEVICE == "cuda":
    n, dtype = (4096 if SMALL else 8192), torch.bfloat16
    ks = [4**i for i in range(2, 7)]  # 16 ... 4096
else:
    n, dtype = 256, torch.float32
    ks = [4**i for i in range(0, 5)]  # 1 ... 256
element = torch.finfo(dtype).bits // 8
points, sweep = {}, []
for k in ks:
    a_, b_ = torch.randn(n, k, device=DEVICE, dtype=dtype), torch.randn(k, n, device=DEVICE, dtype=dtype)
    flops, nbytes = 2 * n * n * k, element * (2 * n * k + n * n)
    r = bench(partial(torch.matmul, a_, b_), name=f"k={k}", flops=flops, bytes=nbytes, dtype=dtype)
    points[f"k={k}"] = (flops / nbytes, r.tflops * 1e12)
    sweep.append((k, flops / nbytes, r))
del a_, b_

key = hardware.dtype_key(dtype)
fig, ax = plt.subplots(figsize=(8, 5))
if SPEC is not None:
    hardware.plot_roofline(ax, SPEC, key, points)
else:
    intensities, achieved = zip(*points.values(), strict=True)
    ax.loglog(intensities, np.array(achieved) / 1e9, "o-")
    for label, (i, f) in points.items():
        ax.annotate(label, (i, f / 1e9), textcoords="offset points", xytext=(5, -10))
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title(f"(n, k) @ (k, n), n={n}, {key}, on {DEVICE}: no datasheet roofs for this device")
    ax.grid(True, which="both", alpha=0.3)
plt.tight_layout()
plt.show()

if SPEC is not None:
    rows = []
    for k, intensity, r in sweep:
        bound = "memory" if intensity < hardware.ridge_point(SPEC, key) else "compute"
        roof = hardware.attainable_flops(intensity, SPEC, key)
        rows.append(
            (
                k,
                f"{intensity:.0f}",
                f"{r.tflops:.1f}",
                f"{r.gbps:.0f}",
                bound,
                f"{r.tflops * 1e12 / roof:.0%}",
            )
        )
    show_table(["k", "FLOP/B", "TFLOP/s", "GB/s", "bound", "of roof"], rows)
else:
    rows = [(k, f"{intensity:.1f}", f"{r.tflops * 1e3:.1f}", f"{r.gbps:.1f}") for k, intensity, r in sweep]
    show_table(["k", "FLOP/B", "GFLOP/s", "GB/s"], rows)

# TFLOP/s at the median time; on a CPU at the fastest repetition, which other processes can't slow down
achieved = [r.flops / (r.min_ms if DEVICE == "cpu" else r.median_ms) / 1e9 for _, _, r in sweep]
if DEVICE == "cuda":  # a shared CPU's timings are too noisy to assert on; a GPU's are not
    assert achieved[-1] > 3 * achieved[0], f"more FLOPs per byte, more FLOP/s: {achieved}"
if SPEC is not None:
    peak = hardware.peak_flops(key, SPEC)
    ridge = hardware.ridge_point(SPEC, key)
    for k, intensity, r in sweep:
        if intensity < ridge / 4:  # well left of the ridge: far below the compute roof
            assert r.tflops * 1e12 < 0.5 * peak, f"k={k}: {r.tflops:.0f} TFLOP/s at {intensity:.0f} FLOP/B"
    assert achieved[-1] * 1e12 > 0.3 * peak, "the square matmul is compute-bound and near its roof"
    RESULTS["roofline"] = (
        f"(n,k)@(k,n) bf16: {achieved[0]:.0f} TFLOP/s at k={ks[0]} (memory-bound), "
        f"{achieved[-1]:.0f} at k={ks[-1]} (ridge {ridge:.0f} FLOP/B)"
    )

# %% [markdown]
# On a GPU, read the plot from left to right: the points climb the slanted memory roof (each 4x step in k does
# 4x the FLOPs per byte moved, so at constant bandwidth it gets 4x the FLOP/s) until they reach the ridge, then
# bend over under the flat compute roof. Most of deep learning outside the big matmuls lives on the left of the
# ridge, which is why so much of this course is about moving fewer bytes.

# %% [markdown]
# ### From a matmul to a training step: MFU
#
# A whole training step is what we pay for, and the number the field quotes for it is *model FLOPs
# utilisation*: the FLOPs the model needs per step (counted from its shapes, not from what the kernels
# happen to do), divided by the step time, divided by the peak. `common.models.transformer` counts the
# matmul FLOPs of one transformer block for us (`block_flops`: forward, plus twice that for the backward);
# we check that count against PyTorch's own FLOP counter, then time a full step (forward, backward, AdamW)
# in bf16 autocast. The check covers the projections and the MLP, exactly. Attention is counted from its
# shapes: its two matmuls, halved because the block is causal and a fused attention kernel skips the masked
# half. PyTorch's counter cannot know what a fused kernel skips, and what it reports for attention depends on
# the backend (on a GPU it counts the full square, plus the scores that the backward pass recomputes; for
# some CPU kernels it counts nothing), so we print its attention count beside ours rather than compare them.
# Elementwise ops, normalisations, the optimizer and launch gaps all take time but add no model FLOPs,
# which is why an MFU is always well below the matmul's fraction of peak.

# %%
if DEVICE == "cuda":
    batch_size, seq, d_model, n_heads = (4, 1024, 1024, 16) if SMALL else (8, 2048, 2048, 16)
else:
    batch_size, seq, d_model, n_heads = 2, 64, 128, 4
block = TransformerBlock(d_model, n_heads).to(DEVICE)
optimizer = torch.optim.AdamW(block.parameters(), lr=1e-4)
tokens = torch.randn(batch_size, seq, d_model, device=DEVICE)


def train_step():
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
        loss = block(tokens).float().square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


step_flops = block_flops(batch_size, seq, d_model)
# Causal attention is half of full attention, so it is also what causal=False adds.
attention_flops = block_flops(batch_size, seq, d_model, causal=False) - step_flops
with FlopCounterMode(display=False) as counter:
    train_step()
by_op = counter.get_flop_counts()["Global"]
counted_attention = sum(flops for op, flops in by_op.items() if "attention" in str(op))
counted_rest = sum(by_op.values()) - counted_attention
show_table(
    ["FLOPs per step (GFLOP)", "block_flops", "PyTorch's counter"],
    [
        ("projections and MLP", f"{(step_flops - attention_flops) / 1e9:.4g}", f"{counted_rest / 1e9:.4g}"),
        ("attention (causal: half)", f"{attention_flops / 1e9:.4g}", f"{counted_attention / 1e9:.4g}"),
    ],
)
assert counted_rest == step_flops - attention_flops, "the non-attention matmuls are counted identically"

step = bench(train_step, name="train step", flops=step_flops, cache="warm")
if DEVICE == "cuda" and SPEC is not None:
    mfu = step.tflops * 1e12 / SPEC.peak_flops["bf16"]
    print(
        f"{step}\nMFU: {step.tflops:.0f} TFLOP/s of model FLOPs / {SPEC.peak_flops['bf16'] / 1e12:.0f} peak = {mfu:.0%}"
    )
    assert 0 < mfu < 1, f"an MFU is a fraction of the peak: {mfu:.2f}"
    assert mfu < matmuls["bf16"].tflops * 1e12 / SPEC.peak_flops["bf16"], "a step is slower than its matmuls"
    RESULTS["MFU"] = f"transformer block d={d_model}, {batch_size}x{seq} tokens, bf16 step: MFU {mfu:.0%}"
else:
    print(step)
    print("No MFU here: it needs the datasheet peak of a GPU (common.hardware has none for a CPU).")

# %% [markdown]
# ## 6. Memory-bound kernels: access patterns and a first Triton kernel
#
# Left of the ridge, time is bytes moved divided by bandwidth, and "bytes moved" means what the memory system
# moves, not what the program uses. DRAM and L2 move data in 32-byte *sectors*. When the 32 threads of a
# warp read 32 consecutive floats, their loads *coalesce* into four sectors and every byte fetched is used.
# When they read floats 128 bytes apart, each float needs a sector of its own: 8x the traffic for the same
# useful bytes.
#
# We copy the same number of floats twice: a contiguous slice `x[:m]`, and a strided view `x[::32]` (every
# 32nd float, 128 bytes apart) of a tensor 32 times larger. Both write m contiguous floats. The GB/s column
# counts useful bytes (m floats read, m written), so it shows what a strided pattern costs in bandwidth you
# pay for but do not use.

# %%
STRIDE = 32  # floats: 128 bytes apart, so every useful float sits in its own 32-byte sector
m = 2**16 if DEVICE == "cpu" else 2**24  # useful floats: 64 MiB on a GPU (x itself is 2 GiB)
x = torch.randn(m * STRIDE, device=DEVICE)
views = {"contiguous x[:m]": x[:m], f"strided x[::{STRIDE}]": x[::STRIDE]}
assert views[f"strided x[::{STRIDE}]"].stride() == (STRIDE,)
torch.testing.assert_close(views[f"strided x[::{STRIDE}]"].clone(), x.view(m, STRIDE)[:, 0], rtol=0, atol=0)
access = {
    name: bench(
        partial(torch.clone, view, memory_format=torch.contiguous_format),  # always a copy, into contiguous
        name=name,
        bytes=2 * m * x.element_size(),
    )
    for name, view in views.items()
}
show_table(
    ["read pattern", "ms", "useful GB/s"],
    [(r.name, f"{r.median_ms:.4f}", f"{r.gbps:.0f}") for r in access.values()],
)
slowdown = access[f"strided x[::{STRIDE}]"].median_ms / access["contiguous x[:m]"].median_ms
if DEVICE == "cuda":
    assert slowdown > 3, f"a 128-byte stride wastes most of each sector: only {slowdown:.1f}x slower"
    RESULTS["strided access"] = (
        f"copying {m // 2**20} Mi floats read with stride {STRIDE}: {slowdown:.1f}x slower"
    )
else:
    print(f"strided / contiguous: {slowdown:.1f}x (on a CPU, caches and prefetchers change the picture)")
del x, views

# %% [markdown]
# On a GPU the strided copy is several times slower for the same useful bytes (the assert checks at least
# 3x). The same waste hides in PyTorch code as a transposed or sliced view fed to a kernel that reads it
# element by element, and in a hand-written kernel whose threads walk down columns instead of along rows.
#
# ### A first Triton kernel: vector add
#
# In this course we write kernels in Triton: a kernel is the program of one *block* of data, and Triton
# turns its loads and stores into coalesced, vectorised memory accesses. `common.kernels.vector_add` is the
# smallest useful one (read it: the kernel is six lines). A grid of programs, one per 1024 elements; each
# computes its offsets with `tl.arange`, masks the ragged end, loads, adds and stores.
#
# It does 1 FLOP per 12 bytes, so it is as memory-bound as a kernel can be, and its yardstick is a copy:
# `measured_copy_bandwidth()` is the speed of a large device-to-device copy, one byte read per byte written.
# It is a yardstick, not a hard roof: a kernel that reads two bytes per byte it writes, like this one, may beat
# it by a few percent (DRAM loses a little time whenever it turns its bus around from reading to writing, and
# a read-heavy mix turns it around less often). Without a GPU the kernel runs in Triton's CPU interpreter (`common.kernels`
# switches it on), which is slow but exact, so on a CPU we check it on a small vector and time nothing.

# %%
n = 98_765 if DEVICE == "cpu" else (2**26 if SMALL else 2**28)  # odd on a CPU: the last block is masked
x, y = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
z = vector_add(x, y)
assert torch.equal(z, x + y), "one fp32 add per element: bit-identical to torch"
if DEVICE == "cuda":
    copy_bw = measured_copy_bandwidth()
    adds = [
        bench(partial(vector_add, x, y), name="Triton vector_add", bytes=3 * x.nbytes),
        bench(partial(torch.add, x, y), name="torch.add", bytes=3 * x.nbytes),
    ]
    show_table(
        ["kernel", "ms", "GB/s", "of measured copy bw", "of datasheet bw"],
        [
            (
                r.name,
                f"{r.median_ms:.3f}",
                f"{r.gbps:.0f}",
                f"{r.gbps * 1e9 / copy_bw:.0%}",
                f"{r.frac_peak_bw:.0%}" if r.frac_peak_bw else "-",
            )
            for r in adds
        ],
    )
    print(f"measured copy bandwidth: {copy_bw / 1e9:.0f} GB/s")
    triton_add = adds[0]
    torch_add = adds[1]
    assert triton_add.gbps * 1e9 > 0.9 * copy_bw, "a vector add streams at the speed of a copy"
    assert triton_add.median_ms < 1.1 * torch_add.median_ms, "as fast as PyTorch's own add"
    RESULTS["Triton vector add"] = (
        f"{n // 2**20} Mi floats: {triton_add.gbps:.0f} GB/s, {triton_add.gbps * 1e9 / copy_bw:.0%} of a copy"
    )
else:
    print(f"vector_add of {n} floats in Triton's interpreter: matches x + y exactly. (Not timed on a CPU.)")
del x, y, z

# %% [markdown]
# A few lines of Triton move bytes at the speed of a copy, as fast as PyTorch's own add (the asserts check at
# least 90% of the measured copy bandwidth, and within 10% of `torch.add`'s time). For a kernel like this one
# that is the whole story: no amount of cleverness inside it can beat the memory roof. The speedups of later weeks come from kernels that do more
# per byte (fusing several ops into one pass) or move fewer bytes.

# %% [markdown]
# ## 7. Streams: overlapping copies with compute
#
# A *stream* is one of the GPU's queues: work in one stream runs in order, work in different streams may run
# at the same time. The GPU has separate *copy engines* for transfers over PCIe, so a host-to-device copy can
# overlap a kernel, if three things are true:
#
# 1. the copy and the kernel are on different streams;
# 2. the host memory is **pinned** (page-locked): the copy engine can only DMA from memory the OS won't move.
#    From ordinary *pageable* memory, CUDA first copies into a pinned staging buffer on the CPU, and the copy
#    is synchronous for the host;
# 3. dependencies are explicit: a kernel must wait for *its* input's copy (`wait_event`), not for everything.
#
# We feed chunks of data to a matmul, like a data loader feeding a model: one stream doing copy, compute,
# copy, compute..., against a copy stream that runs ahead of the compute stream. Events recorded around every
# copy and every matmul give a timeline of what the GPU did.

# %%
if DEVICE == "cuda":
    chunks, side = (4 if SMALL else 8), 4096  # each chunk: 4096 x 4096 fp32 = 64 MiB
    weight = torch.randn(side, side, device=DEVICE)
    host = {
        "pageable": [torch.empty(side, side).fill_(1.0) for _ in range(chunks)],
        "pinned": [torch.empty(side, side, pin_memory=True).fill_(1.0) for _ in range(chunks)],
    }
    # Device buffers for inputs and outputs, allocated once. (Allocating them inside the loop on the copy
    # stream and using them on the compute stream would need tensor.record_stream(compute_stream), or the
    # allocator could hand a block back to the copy stream while the matmul still reads it.)
    inputs = [torch.empty(side, side, device=DEVICE) for _ in range(chunks)]
    outputs = [torch.empty(side, side, device=DEVICE) for _ in range(chunks)]
    copy_stream = torch.cuda.Stream()

    def new_event():
        return torch.cuda.Event(enable_timing=True)

    def pipeline(memory, overlap):
        """Copy each chunk to the GPU and multiply it by weight; return total ms and the timeline."""
        compute = torch.cuda.current_stream()
        copy = copy_stream if overlap else compute
        start = new_event()
        start.record(compute)
        if overlap:
            copy.wait_stream(compute)  # nothing on the copy stream starts before `start`
        spans = []  # (lane, begin event, end event)
        for i in range(chunks):
            with torch.cuda.stream(copy):
                copied = (new_event(), new_event())
                copied[0].record(copy)
                inputs[i].copy_(host[memory][i], non_blocking=True)
                copied[1].record(copy)
            compute.wait_event(copied[1])  # the matmul of chunk i waits for the copy of chunk i only
            computed = (new_event(), new_event())
            computed[0].record(compute)
            torch.matmul(inputs[i], weight, out=outputs[i])
            computed[1].record(compute)
            spans += [("copy", *copied), ("compute", *computed)]
        end = new_event()
        end.record(compute)
        end.synchronize()
        timeline = [(lane, start.elapsed_time(e0), start.elapsed_time(e1)) for lane, e0, e1 in spans]
        return start.elapsed_time(end), timeline

    runs = {}
    for memory in ("pageable", "pinned"):
        for overlap in (False, True):
            pipeline(memory, overlap)  # warm-up
            totals, timeline = [], None
            for _ in range(3):
                total, timeline = pipeline(memory, overlap)
                totals.append(total)
            runs[(memory, overlap)] = (float(np.median(totals)), timeline)

    rows, copy_bandwidth = [], {}
    for (memory, overlap), (total, timeline) in runs.items():
        copy_ms = sum(t1 - t0 for lane, t0, t1 in timeline if lane == "copy")
        bandwidth = chunks * side * side * 4 / (copy_ms * 1e-3)
        copy_bandwidth.setdefault(memory, []).append(bandwidth)
        rows.append(
            (
                memory,
                "copy stream + compute" if overlap else "one stream",
                f"{total:.1f}",
                f"{bandwidth / 1e9:.1f}",
            )
        )
    show_table(["host memory", "streams", "total ms", "copy GB/s"], rows)

    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 1.3 * len(runs) + 0.6), sharex=True)
    for ax, ((memory, overlap), (total, timeline)) in zip(axes, runs.items(), strict=True):
        for lane, t0, t1 in timeline:
            y = 1 if lane == "copy" else 0
            ax.barh(y, t1 - t0, left=t0, color="C1" if lane == "copy" else "C0", edgecolor="white")
        ax.set_yticks([0, 1], ["compute", "copy"])
        ax.set_title(
            f"{memory} host memory, {'copy stream + compute stream' if overlap else 'one stream'}: {total:.1f} ms",
            fontsize=10,
        )
    axes[-1].set_xlabel("ms since start (CUDA events)")
    plt.tight_layout()
    plt.show()

    serial, overlapped = runs[("pinned", False)][0], runs[("pinned", True)][0]
    assert overlapped < 0.9 * serial, f"overlap should hide copy time: {overlapped:.1f} vs {serial:.1f} ms"
    assert max(copy_bandwidth["pinned"]) > max(copy_bandwidth["pageable"]), "pinned memory copies faster"
    RESULTS["copy/compute overlap"] = (
        f"pinned copies + matmuls: {serial:.1f} ms on one stream, "
        f"{overlapped:.1f} ms on two ({1 - overlapped / serial:.0%} saved)"
    )
    del host, inputs, outputs, weight
else:
    print("Skipped on CPU: streams, pinned memory and copy engines are GPU features.")

# %% [markdown]
# In the two-stream pinned run the copies (orange) run ahead on their own stream, under the matmuls (blue) of
# earlier chunks: only the first copy is exposed. With pageable memory the copies are slower and the host
# blocks in each one, so much of the overlap is lost. This is what `DataLoader(pin_memory=True)` plus
# `tensor.to(device, non_blocking=True)` buys in a training loop.
#
# ## 8. Launch overhead and fusion
#
# ### CUDA graphs
#
# Every kernel launch costs the CPU microseconds (Python, the PyTorch dispatcher, the CUDA driver: part 2
# measured it on this machine). For big kernels that is hidden behind the GPU's work; for tiny ones the GPU
# finishes each kernel before the CPU has launched the next, and the program is *launch-bound*: the GPU sits
# idle most of the time.
#
# A *CUDA graph* records a sequence of kernels once and replays it with a single launch. The price: shapes,
# addresses and control flow are frozen at capture, so inputs must be copied into the captured ("static")
# tensors, and the results read from the captured outputs. Our test case: 50 elementwise ops on a tensor of
# 1024 floats, about a microsecond of GPU work each.


# %%
def tiny_chain(x):
    for _ in range(25):
        x = x * 0.999 + 0.001  # two kernels: a multiply and an add
    return x


if DEVICE == "cuda":
    static_x = torch.randn(1024, device=DEVICE)
    # Warm up on a side stream before capturing (as the CUDA-graph docs require), so lazy initialisation
    # inside the ops is not recorded into the graph.
    side_stream = torch.cuda.Stream()
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):
        for _ in range(3):
            tiny_chain(static_x)
    torch.cuda.current_stream().wait_stream(side_stream)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = tiny_chain(static_x)  # recorded, not run

    fresh = torch.randn(1024, device=DEVICE)
    static_x.copy_(fresh)  # new input goes into the captured tensor...
    graph.replay()  # ...the 50 kernels run with one launch...
    torch.testing.assert_close(static_y, tiny_chain(fresh))  # ...and the output appears in the captured one

    eager = bench(partial(tiny_chain, static_x), name="eager", cache="warm")
    replay = bench(graph.replay, name="graph.replay()", cache="warm")
    auto = bench(partial(tiny_chain, static_x), name="bench(cuda_graph=True)", cuda_graph=True)
    graph_results = [eager, replay, auto]
    show_table(
        ["version", "us per chain", "us per op"],
        [(r.name, f"{r.median_ms * 1e3:.1f}", f"{r.median_ms * 1e3 / 50:.2f}") for r in graph_results],
    )
    fig, ax = plt.subplots(figsize=(7, 2.5))
    ax.barh(
        [r.name for r in graph_results], [r.median_ms * 1e3 for r in graph_results], color=["C3", "C0", "C0"]
    )
    ax.set_xlabel("us per chain of 50 tiny ops")
    ax.invert_yaxis()
    plt.tight_layout()
    plt.show()
    speedup = eager.median_ms / replay.median_ms
    assert speedup > 1.5, f"graph replay only {speedup:.2f}x faster than eager"
    assert auto.timer == "cuda_graph"
    RESULTS["CUDA graph"] = (
        f"50 tiny ops: {eager.median_ms * 1e3:.0f} us eager, "
        f"{replay.median_ms * 1e3:.0f} us as a graph ({speedup:.1f}x)"
    )
else:
    print("Skipped on CPU: CUDA graphs remove GPU launch overhead. (On a CPU there are no launches to save.)")

# %% [markdown]
# `common.bench(fn, cuda_graph=True)` does the capture for us and times replays: a way to measure what a
# kernel costs the GPU without the CPU's launch overhead. `torch.compile(mode="reduce-overhead")` applies CUDA
# graphs to a model automatically.
#
# ### `torch.compile`: fusing a chain of elementwise ops
#
# Each eager elementwise op reads its inputs from memory and writes its output back: a chain of eight ops on
# a large tensor moves the tensor through HBM about 18 times, although one pass in and one out would do.
# `torch.compile` captures the Python function as a graph (TorchDynamo), and its backend (Inductor) *fuses*
# the chain into one generated kernel that keeps intermediates in registers.
#
# First, what the compiler sees. We give `torch.compile` a backend that only records the captured graph,
# which is cheap, and count the memory traffic of eager execution from it: each op reads its tensor inputs
# and writes one output.


# %%
def gelu_chain(x):
    """The tanh approximation of GELU, written out as eight elementwise ops."""
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * x**3)))


captured = []


def record_graph(graph_module, example_inputs):
    captured.append(graph_module)
    return graph_module.forward  # run the captured graph as it is: no code generation


x_small = torch.randn(1000)
torch.testing.assert_close(torch.compile(gelu_chain, backend=record_graph)(x_small), gelu_chain(x_small))
ops = [node for node in captured[0].graph.nodes if node.op == "call_function"]
passes = sum(1 + sum(isinstance(arg, torch.fx.Node) for arg in node.args) for node in ops)
print(captured[0].code.strip())
print(
    f"\n{len(ops)} ops -> {len(ops)} kernels in eager mode, {passes} tensor passes through memory (fused: 2)"
)
assert len(ops) == 8 and passes == 18  # 10 reads + 8 writes
torch._dynamo.reset()  # forget this capture before compiling the same function with Inductor

# %% [markdown]
# Now the real compile. On a GPU, Inductor generates a Triton kernel; the first call compiles (seconds), later
# calls reuse it. On a CPU, Inductor generates C++ and runs a C++ compiler: on a 2-core machine the first
# compile of this small function takes over a minute, longer than the whole rest of this notebook, so on a CPU
# we only time the eager version.

# %%
# 1 GiB on a GPU at full size: the fused kernel then moves 2 GiB per call, which keeps the GPU busy long
# enough that the host's cost of calling the compiled function (guards, wrapper, launch) is not timed.
n = 2**20 if DEVICE == "cpu" else (2**24 if SMALL else 2**28)
x = torch.randn(n, device=DEVICE)
eager = bench(partial(gelu_chain, x), name="eager", bytes=passes * x.nbytes)
if DEVICE == "cuda":
    compiled_chain = torch.compile(gelu_chain)
    t0 = time.perf_counter()
    y_compiled = compiled_chain(x)
    sync()
    compile_s = time.perf_counter() - t0
    torch.testing.assert_close(y_compiled, gelu_chain(x), rtol=1e-4, atol=1e-5)
    compiled = bench(partial(compiled_chain, x), name="torch.compile", bytes=2 * x.nbytes)
    print(
        f"first call (compile): {compile_s:.1f} s; "
        f"measured copy bandwidth: {measured_copy_bandwidth() / 1e9:.0f} GB/s"
    )
    show_table(
        ["version", "ms", "bytes moved", "GB/s", "of measured copy bw"],
        [
            (
                r.name,
                f"{r.median_ms:.3f}",
                f"{r.bytes / GiB:.2f} GiB",
                f"{r.gbps:.0f}",
                f"{r.frac_measured_bw:.0%}",
            )
            for r in (eager, compiled)
        ],
    )
    fig, (ax_time, ax_bytes) = plt.subplots(1, 2, figsize=(9, 2.8))
    names = [eager.name, compiled.name]
    ax_time.bar(names, [eager.median_ms, compiled.median_ms], color=["C3", "C0"])
    ax_time.set_ylabel("ms")
    ax_time.set_title("time")
    ax_bytes.bar(names, [eager.bytes / GiB, compiled.bytes / GiB], color=["C3", "C0"])
    ax_bytes.set_ylabel("GiB")
    ax_bytes.set_title("memory traffic")
    fig.suptitle(f"gelu chain on {n / 2**20:.0f} Mi floats")
    plt.tight_layout()
    plt.show()
    speedup = eager.median_ms / compiled.median_ms
    assert speedup > 2, f"fusion should pay on a memory-bound chain, got {speedup:.2f}x"
    RESULTS["torch.compile"] = (
        f"gelu chain: {speedup:.1f}x faster compiled, {passes // 2}x fewer bytes (compile {compile_s:.0f} s)"
    )
else:
    print(eager)
    print("torch.compile skipped on CPU (compile time); on a GPU it runs here.")
    RESULTS["gelu chain"] = f"CPU eager gelu chain: {eager.gbps:.1f} GB/s of memory traffic ({passes} passes)"

# %% [markdown]
# On a GPU both versions run at a similar fraction of the memory bandwidth; the compiled one is faster because
# it moves about 9x fewer bytes. That is the typical shape of a fusion win: the same bandwidth, less traffic.
#
# ## 9. Numerics and debugging
#
# ### Floating-point addition is not associative
#
# In floating point, `(a + b) + c` need not equal `a + (b + c)`: every addition rounds. The classic example:

# %%
big, one = torch.tensor(1e8), torch.tensor(1.0)  # float32: spacing between numbers near 1e8 is 8
print(f"(1e8 + 1) - 1e8 = {((big + one) - big).item()},  (1e8 - 1e8) + 1 = {((big - big) + one).item()}")
assert ((big + one) - big).item() == 0.0 and ((big - big) + one).item() == 1.0

# %% [markdown]
# So the result of a sum depends on the order of the additions, and different algorithms use different
# orders. A running (sequential) sum adds each small number to an ever larger total and loses more and more of
# its low bits: its error grows with n. A pairwise (tree) sum adds numbers of similar size and its error grows
# only with log n; PyTorch's CPU and GPU reductions are tree-like. We sum a million numbers in [0, 1) in float32
# and compare with a float64 reference.

# %%
values = torch.rand(10**6, generator=torch.Generator().manual_seed(0))
reference = values.double().sum().item()
running = np.cumsum(values.numpy(), dtype=np.float32)  # strictly left to right, in float32
sums = {
    "float32, running sum (np.cumsum)": float(running[-1]),
    "float32, torch.sum on CPU": values.sum().item(),
    "float32, torch.sum, reversed order": values.flip(0).sum().item(),
    "float32, torch.sum, sorted": values.sort().values.sum().item(),
}
if DEVICE == "cuda":
    sums["float32, torch.sum on GPU"] = values.to(DEVICE).sum().item()
sums["float64 (reference)"] = reference
show_table(
    ["method", "sum", "relative error"],
    [(k, f"{v:.6f}", f"{abs(v - reference) / reference:.1e}") for k, v in sums.items()],
)

# error of the running sum after every prefix, and of torch.sum over the same prefixes
prefix_reference = np.cumsum(values.numpy(), dtype=np.float64)
m = np.unique(np.geomspace(100, values.numel(), 30).astype(int))
running_error = np.abs(running[m - 1] - prefix_reference[m - 1]) / prefix_reference[m - 1]
tree_error = np.array(
    [abs(values[:k].sum().item() - prefix_reference[k - 1]) / prefix_reference[k - 1] for k in m]
)
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.loglog(m, running_error + 1e-12, "o-", label="running sum")
ax.loglog(m, tree_error + 1e-12, "s-", label="torch.sum (pairwise)")
ax.axhline(2**-24, color="gray", linestyle="--", label="float32 rounding unit")
ax.set_xlabel("number of values summed")
ax.set_ylabel("relative error (vs float64)")
ax.set_title("float32 summation error")
ax.legend()
plt.tight_layout()
plt.show()

error = {k: abs(v - reference) / reference for k, v in sums.items()}
assert error["float32, running sum (np.cumsum)"] > 10 * error["float32, torch.sum on CPU"], error
assert all(e < 1e-5 for k, e in error.items() if "torch.sum" in k), error
if DEVICE == "cpu":  # on a GPU machine the summary has room for GPU results only
    RESULTS["float32 sums"] = (
        f"sum of 1e6 floats: running-sum error {error['float32, running sum (np.cumsum)']:.0e}, "
        f"pairwise {error['float32, torch.sum on CPU']:.0e}"
    )

# %% [markdown]
# The CPU and GPU sums (if there is a GPU) are both accurate but need not be bit-identical: they add in
# different orders. Compare results across devices with a tolerance, never with `==`.
#
# ### Atomics make results change from run to run
#
# Some GPU kernels accumulate with *atomic* additions: thousands of threads add into the same outputs in
# whatever order they happen to arrive, so the rounding differs from run to run. `index_add_` (and
# `scatter_add_`, and the backward of embedding and indexing) work this way on CUDA.
# `torch.use_deterministic_algorithms(True)` switches such ops to deterministic (usually slower) algorithms,
# and makes ops that have none raise an error. cuBLAS matmuls are deterministic for a fixed GPU, library
# version and stream: PyTorch gives each cuBLAS handle and stream its own workspace. Older PyTorch releases
# also required the environment variable `CUBLAS_WORKSPACE_CONFIG=:4096:8` in deterministic mode and raised
# an error without it; torch 2.11 no longer checks for it (the cell checks that too).

# %%
if DEVICE == "cuda":
    source = torch.randn(10**6, device=DEVICE)
    index = torch.randint(0, 100, (10**6,), device=DEVICE)

    def scatter_sum():
        return torch.zeros(100, device=DEVICE).index_add_(0, index, source)

    deterministic = torch.are_deterministic_algorithms_enabled()
    rows, outcomes = [], {}
    for mode in (False, True):
        torch.use_deterministic_algorithms(mode)
        try:
            results = torch.stack([scatter_sum() for _ in range(10)])
        finally:
            torch.use_deterministic_algorithms(deterministic)
        distinct = torch.unique(results, dim=0).shape[0]
        spread = (results - results[0]).abs().max().item()
        outcomes[mode] = distinct
        rows.append(("deterministic" if mode else "default (atomics)", distinct, f"{spread:.1e}"))
    show_table(["mode", "distinct results in 10 runs", "max difference"], rows)
    assert outcomes[True] == 1, "deterministic mode gives bit-identical results"
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    print(
        f"index_add_ on the GPU: {outcomes[False]} distinct results in 10 runs by default, 1 when deterministic"
    )

    # A matmul in deterministic mode, whether or not CUBLAS_WORKSPACE_CONFIG is set: no error, same bits.
    w = torch.randn(2048, 2048, device=DEVICE)
    torch.use_deterministic_algorithms(True)
    try:
        products = [w @ w for _ in range(10)]  # older releases raised here without the variable
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert all(torch.equal(p, products[0]) for p in products), "cuBLAS: the same matmul gives the same bits"
    print(
        "matmul in deterministic mode with CUBLAS_WORKSPACE_CONFIG "
        f"{'set' if 'CUBLAS_WORKSPACE_CONFIG' in os.environ else 'not set'}: no error, 1 distinct result in 10"
    )
    del w, products
else:
    print(
        "Skipped on CPU: the CPU index_add_ adds in a fixed order, so its result does not change between runs."
    )

# %% [markdown]
# ### Asynchronous errors point at the wrong line
#
# Because kernels run after their launch returned, an error *inside* a kernel (an out-of-bounds index trips a
# device-side assert) is only noticed by the host at a later CUDA call, often a synchronising one: the Python
# traceback then points at an innocent line. `CUDA_LAUNCH_BLOCKING=1` makes every launch wait for its kernel,
# so the error surfaces at the line that caused it (slowly: use it for debugging only).
#
# A device-side assert also leaves the CUDA context unusable: every later CUDA call in that process fails, and
# only a restart helps. So we run the buggy program in a child process (`sys.executable -c`), which keeps this
# notebook's kernel alive. The program queues some matmuls first, so the GPU is behind the CPU when the bad
# index arrives, as it usually is in a real training loop.

# %%
BUGGY_PROGRAM = textwrap.dedent(
    """\
    import torch
    x = torch.zeros(10, device="cuda")
    index = torch.tensor([20], device="cuda")  # past the end of x
    w = torch.randn(4096, 4096, device="cuda")
    busy = w @ w @ w @ w  # a few ms of queued work
    y = x[index]  # line 6: THE BUG, checked on the GPU when the kernel runs
    print("line 7 ran: no error yet", flush=True)
    z = y * 2
    print("z =", z.item())  # line 9: .item() waits for the GPU
    """
)
BUG_LINE = 6

if DEVICE == "cuda":
    reported = {}
    for blocking in (False, True):
        env = {k: v for k, v in os.environ.items() if k != "CUDA_LAUNCH_BLOCKING"}
        if blocking:
            env["CUDA_LAUNCH_BLOCKING"] = "1"
        proc = subprocess.run(
            [sys.executable, "-c", BUGGY_PROGRAM], capture_output=True, text=True, env=env, timeout=300
        )
        assert proc.returncode != 0, "the buggy program should fail"
        lines = [int(line) for line in re.findall(r'File "<string>", line (\d+)', proc.stderr)]
        reported[blocking] = lines[-1]
        stderr = proc.stderr.splitlines()
        message = next((line for line in stderr if "Error:" in line), stderr[-1] if stderr else "")
        device_assert = next((line for line in stderr if "Assertion" in line), "")
        print(
            f"CUDA_LAUNCH_BLOCKING={int(blocking)}: error reported at line {lines[-1]} (bug at line {BUG_LINE})"
        )
        print(f"  stdout: {proc.stdout.strip() or '(nothing)'}")
        print(f"  stderr: {device_assert.strip()[-160:]}")
        print(f"          {message.strip()}\n")
    assert reported[False] > BUG_LINE, "asynchronous: the error surfaces at a later line"
    assert reported[True] == BUG_LINE, "with CUDA_LAUNCH_BLOCKING=1 it surfaces at the bug"
    RESULTS["async error"] = (
        f"out-of-bounds index at line {BUG_LINE} reported at line {reported[False]}; "
        f"with CUDA_LAUNCH_BLOCKING=1 at line {reported[True]}"
    )
else:
    try:
        torch.zeros(10)[torch.tensor([20])]
        raised = None
    except IndexError as error:
        raised = error
    print(f"On the CPU the bad index raises at once, on the line with the bug:\n  IndexError: {raised}")
    assert isinstance(raised, IndexError)

# %% [markdown]
# ## Summary
#
# - Time GPU code with CUDA events (or `common.bench`), never with a bare `perf_counter`.
# - Compare every number with a ceiling: the datasheet peak for compute, the bandwidth for memory traffic.
#   The roofline says which one applies.
# - Tensor cores (TF32, bf16, fp16) are where the FLOP/s are, at a known cost in precision. The peaks assume a
#   clock that a GPU at its power limit does not hold; a training step's MFU is well below a matmul's
#   fraction of peak.
# - A launch is host work: microseconds for an elementwise op, more for a matmul, much more on a first call.
#   Warm up before timing.
# - Memory-bound kernels are judged in GB/s against a copy; strided access wastes most of every sector.
#   A first Triton kernel already streams at close to copy speed.
# - Overlap copies with compute (pinned memory, streams); remove launch overhead (CUDA graphs); move fewer
#   bytes (fusion, `torch.compile`).
# - Floating-point results depend on the order of operations: compare with tolerances, and use deterministic
#   algorithms when you need bit-identical runs.

# %% tags=["summary"]
for key, line in RESULTS.items():
    print(f"{key}: {line}")
