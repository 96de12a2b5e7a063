"""Profiling helpers: torch.profiler with a schedule and a trace, CUDA memory snapshots, NVTX ranges.

    prof = profile_steps(train_step, trace_path="trace.json")   # wait 1, warm up 1, record 3 steps
    print(top_ops_table(prof, k=10))                             # where the time went, by self time
    ops = op_stats(prof)                                         # {(name, "cpu" | "cuda"): OpStat}
    # open trace.json in https://ui.perfetto.dev (or chrome://tracing) for the timeline

    with memory_history():                                       # CUDA only
        train_step()
        snapshot = memory_snapshot()
    print(summarize_snapshot(snapshot))                          # peak, segments, largest allocations
    dump_memory_snapshot("snapshot.pickle")                      # drag into https://pytorch.org/memory_viz

    trace = json.loads(Path("trace.json").read_text())           # does communication overlap compute?
    for kernel in comm_overlap(trace, comm="AllGather", ranges=["forward#0"])["forward#0"]:
        print(kernel.name, kernel.covered_fraction)              # share of it run beside compute kernels

A profiler changes what it measures: it adds a few microseconds per op, more with record_shapes,
profile_memory or with_stack. Use it to find where time goes, and common.bench to measure how long things take.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import ProfilerActivity

from common.hardware import NoGPUError

__all__ = [
    "CommOverlap",
    "MemorySummary",
    "OpStat",
    "Span",
    "comm_overlap",
    "covered_us",
    "interval_union",
    "dump_memory_snapshot",
    "memory_history",
    "memory_snapshot",
    "memory_timeline",
    "nvtx_range",
    "op_stats",
    "profile_steps",
    "profiler",
    "total_length",
    "summarize_snapshot",
    "top_ops",
    "top_ops_table",
    "trace_spans",
]


# ----------------------------------------------------------------------------------------------------
# torch.profiler
# ----------------------------------------------------------------------------------------------------


def profiler(
    *,
    wait: int = 1,
    warmup: int = 1,
    active: int = 3,
    trace_path: str | Path | None = None,
    record_shapes: bool = False,
    profile_memory: bool = False,
    with_stack: bool = False,
    cuda: bool | None = None,
) -> torch.profiler.profile:
    """A torch.profiler.profile that skips `wait` steps, warms up for `warmup`, then records `active` steps.

    Call prof.step() at the end of every training step. Skipping and warming up keep one-time costs (cuDNN
    autotuning, allocator growth, lazy initialisation) out of the recording; the warm-up steps run the
    profiler too, so its own start-up cost is not recorded either.
    trace_path: write a Chrome trace (JSON) there when the recording ends.
    cuda: also record GPU kernels (default: when a CUDA GPU is available).
    """
    if min(wait, warmup) < 0 or active < 1:
        raise ValueError(f"need wait >= 0, warmup >= 0, active >= 1; got {wait}, {warmup}, {active}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda and not torch.cuda.is_available():
        raise NoGPUError(
            "cuda=True asks to record GPU kernels, but no CUDA GPU is available; leave cuda=None"
        )
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if not torch.cuda.is_available():
        # The profiler's backend (Kineto) probes for GPUs when it starts and logs "gpuGetDeviceCount failed
        # with code 35" on a machine without one: noise for a CPU-only recording. Its log level is read at
        # that start, so setting it here is enough; a level the user chose is kept.
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")

    def on_trace_ready(prof: torch.profiler.profile) -> None:
        if trace_path is not None:
            Path(trace_path).parent.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(os.fspath(trace_path))

    return torch.profiler.profile(
        activities=activities,
        # repeat=1: one recording; with the default (0) the profiler would cycle and keep only the last.
        schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1),
        on_trace_ready=on_trace_ready,
        acc_events=True,  # one cycle, so nothing accumulates; it only silences a warning about cycles
        record_shapes=record_shapes,
        profile_memory=profile_memory,
        with_stack=with_stack,
    )


def profile_steps(
    step: Callable[[], object], *, wait: int = 1, warmup: int = 1, active: int = 3, **kwargs: Any
) -> torch.profiler.profile:
    """Run step() wait + warmup + active times under profiler(...), each as one profiler step.

    Each step is labelled "ProfilerStep#N" in the trace. kwargs go to profiler() (trace_path, record_shapes,
    ...). Returns the finished profiler, for top_ops.
    """
    prof = profiler(wait=wait, warmup=warmup, active=active, **kwargs)
    with prof:
        for _ in range(wait + warmup + active):
            step()
            prof.step()
    return prof


@dataclass(frozen=True)
class OpStat:
    """One row of the profiler's table: an op (or record_function label) aggregated over its calls.

    Self time excludes the ops it called; total time includes them.
    device: where the row was recorded. "cpu": an op, a CUDA runtime call (cudaStreamSynchronize, ...) or a
        record_function range on the host; its device times are the GPU kernels it (and, for the total,
        everything it called) launched, 0 on a CPU-only profile. "cuda" (or another accelerator): the
        GPU-side copy of a record_function range, or a kernel. For a range, the GPU-side time is the span
        from the start of its first kernel to the end of its last, idle gaps included: it can exceed the
        GPU's busy time, even the whole profile's. The kernel time of a range is device_total_ms of its
        "cpu" row.
    A record_function range has one row of each, so rows are told apart by `key`, (name, device).
    """

    name: str
    calls: int
    self_cpu_ms: float
    cpu_total_ms: float
    self_device_ms: float
    device_total_ms: float
    device: str = "cpu"

    @property
    def key(self) -> tuple[str, str]:
        """(name, device): unique within one profile, unlike the name."""
        return (self.name, self.device)


def _device_name(event: Any) -> str:
    """The profiler event's device type, lower-cased: "cpu", "cuda", ..."""
    device_type = getattr(event, "device_type", None)
    return str(getattr(device_type, "name", device_type or "cpu")).lower()


def _op_rows(prof: torch.profiler.profile) -> list[OpStat]:
    """Every row of prof.key_averages() but the ProfilerStep#N labels, one per (name, device)."""
    rows: dict[tuple[str, str], OpStat] = {}
    for e in prof.key_averages():
        if e.key.startswith("ProfilerStep"):
            continue
        row = OpStat(
            name=e.key,
            calls=e.count,
            self_cpu_ms=e.self_cpu_time_total / 1e3,
            cpu_total_ms=e.cpu_time_total / 1e3,
            self_device_ms=e.self_device_time_total / 1e3,
            device_total_ms=e.device_time_total / 1e3,
            device=_device_name(e),
        )
        old = rows.get(row.key)
        if old is not None:  # key_averages splits rows by more than (name, device): add them up
            row = OpStat(
                row.name,
                old.calls + row.calls,
                old.self_cpu_ms + row.self_cpu_ms,
                old.cpu_total_ms + row.cpu_total_ms,
                old.self_device_ms + row.self_device_ms,
                old.device_total_ms + row.device_total_ms,
                row.device,
            )
        rows[row.key] = row
    return list(rows.values())


def op_stats(prof: torch.profiler.profile) -> dict[tuple[str, str], OpStat]:
    """Every op of the recorded steps, keyed by (name, device): ops[("augment", "cpu")].cpu_total_ms.

    A record_function label recorded with GPU activity has a "cpu" row (host time; the kernel time it
    launched as device_total_ms) and a "cuda" row (the span of its kernels on the GPU): a dict keyed by
    name alone would keep one of them and lose the other.
    """
    return {row.key: row for row in _op_rows(prof)}


def top_ops(prof: torch.profiler.profile, k: int = 10, *, by: str | None = None) -> list[OpStat]:
    """The k ops with the most self time, over the recorded (active) steps.

    by: "cpu" or "device"; default "device" when GPU kernels were recorded (what the GPU spent), else "cpu".
    ProfilerStep#N rows (the step labels themselves) are left out. A name can appear twice, once per
    device (see OpStat): look rows up with op_stats(), by (name, device).
    """
    rows = _op_rows(prof)
    if by is None:
        by = "device" if any(r.self_device_ms > 0 for r in rows) else "cpu"
    if by not in ("cpu", "device"):
        raise ValueError(f"by must be 'cpu' or 'device', got {by!r}")
    key = (lambda r: r.self_device_ms) if by == "device" else (lambda r: r.self_cpu_ms)
    return sorted(rows, key=key, reverse=True)[:k]


def top_ops_table(prof: torch.profiler.profile, k: int = 10, *, by: str | None = None) -> str:
    """PyTorch's own profiler table, sorted by self device time (GPU recorded) or self CPU time, top k rows."""
    if by is None:
        by = "device" if any(e.self_device_time_total > 0 for e in prof.key_averages()) else "cpu"
    sort_by = {"device": "self_device_time_total", "cpu": "self_cpu_time_total"}[by]
    return prof.key_averages().table(sort_by=sort_by, row_limit=k)


# ----------------------------------------------------------------------------------------------------
# Chrome traces: does communication overlap compute?
# ----------------------------------------------------------------------------------------------------

COMM_KERNEL_PREFIX = "nccl"  # NCCL's kernels: ncclDevKernel_AllGather_RING_LL, ncclKernel_ReduceScatter_...


@dataclass(frozen=True)
class Span:
    """One complete event of a Chrome trace: a GPU kernel (stream: its CUDA stream) or a host range such as a
    record_function label (stream None). Times in microseconds, on the trace's one clock (the profiler maps the
    GPU's timestamps onto the host's)."""

    name: str
    start_us: float
    end_us: float
    stream: int | None = None


def trace_spans(trace: dict[str, Any], category: str) -> list[Span]:
    """The complete ("X") events of `category` in a Chrome trace (the JSON of prof.export_chrome_trace), by
    start: "kernel" for GPU kernels, each with its stream; "user_annotation" for record_function ranges on
    the host. ValueError for a trace without "traceEvents", or a kernel without its stream."""
    if "traceEvents" not in trace:
        raise ValueError(f"not a Chrome trace: no 'traceEvents' among its keys {sorted(trace)[:5]}")
    spans = []
    for event in trace["traceEvents"]:
        if event.get("ph") != "X" or event.get("cat") != category:
            continue
        stream = event.get("args", {}).get("stream")
        if category == "kernel" and stream is None:
            raise ValueError(
                f"kernel {event.get('name')!r} at {event.get('ts')} us has no 'stream' in its args"
            )
        start = float(event["ts"])
        spans.append(Span(event["name"], start, start + float(event["dur"]), stream))
    return sorted(spans, key=lambda span: span.start_us)


Interval = tuple[float, float]  # (start, end)


def interval_union(intervals: Sequence[Interval]) -> list[Interval]:
    """The union of (start, end) intervals, as sorted disjoint intervals: time covered twice counts once."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def total_length(intervals: Sequence[Interval]) -> float:
    """The summed length of (start, end) intervals; pass disjoint ones (interval_union) to measure time."""
    return sum(e - s for s, e in intervals)


def covered_us(span: Span, others: list[Span]) -> float:
    """How long, within `span`, at least one of `others` runs: their union clipped to span (time two of them
    share counts once)."""
    clipped = [
        (max(o.start_us, span.start_us), min(o.end_us, span.end_us))
        for o in others
        if o.start_us < span.end_us and o.end_us > span.start_us
    ]
    return total_length(interval_union(clipped))


@dataclass(frozen=True)
class CommOverlap:
    """One communication kernel, and how long compute kernels on other streams ran while it did."""

    name: str
    stream: int
    duration_us: float
    covered_us: float

    @property
    def covered_fraction(self) -> float:
        """Share of the kernel's time with compute running beside it (1.0 for a kernel of no duration)."""
        return self.covered_us / self.duration_us if self.duration_us > 0 else 1.0


def comm_overlap(trace: dict[str, Any], *, comm: str, ranges: list[str]) -> dict[str, list[CommOverlap]]:
    """For each host range named in `ranges` (record_function labels), every kernel whose name contains `comm`
    ("AllGather", "ReduceScatter") and that starts inside the range, with the time compute kernels (any kernel
    not NCCL's) on other streams cover it: how much of that communication was hidden behind computation.

    A kernel belongs to the range it starts in; end each range with torch.cuda.synchronize() so that its
    kernels end inside it, and the next range's start after it. A range without such kernels maps to [];
    ValueError for a range the trace does not hold exactly once.
    """
    labels = trace_spans(trace, "user_annotation")
    kernels = trace_spans(trace, "kernel")
    compute = [k for k in kernels if not k.name.startswith(COMM_KERNEL_PREFIX)]
    communication = [k for k in kernels if k.name.startswith(COMM_KERNEL_PREFIX) and comm in k.name]
    result = {}
    for name in ranges:
        found = [label for label in labels if label.name == name]
        if len(found) != 1:
            raise ValueError(f"the trace holds the range {name!r} {len(found)} times; expected once")
        window = found[0]
        inside = [k for k in communication if window.start_us <= k.start_us <= window.end_us]
        result[name] = [
            CommOverlap(
                k.name,
                k.stream,
                k.end_us - k.start_us,
                covered_us(k, [c for c in compute if c.stream != k.stream]),
            )
            for k in inside
        ]
    return result


# ----------------------------------------------------------------------------------------------------
# CUDA memory snapshots
# ----------------------------------------------------------------------------------------------------


def _require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise NoGPUError(
            f"{what} records the CUDA caching allocator, and no CUDA GPU is available. On a CPU, "
            "profile_steps(step, profile_memory=True) reports the memory each op allocates."
        )


@contextlib.contextmanager
def memory_history(max_entries: int = 100_000) -> Iterator[None]:
    """Record every CUDA allocation and free (with its Python and C++ stack) inside the block.

    Take memory_snapshot() or dump_memory_snapshot() before the block ends: leaving it stops recording.
    Cost: a Python stack capture per allocation (microseconds), and up to max_entries events of memory.
    C++ stacks are left out: symbolising them makes a snapshot take seconds to minutes.
    """
    _require_cuda("memory_history")
    # clear_history: the snapshot shows this block only, not what an earlier recording left in the buffer.
    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python", clear_history=True)
    try:
        yield
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)


def memory_snapshot() -> dict[str, Any]:
    """The allocator's state now: segments and their blocks, plus the event trace if history is recorded.

    The format is documented in torch.cuda.memory._snapshot: {"segments": [...], "device_traces": [...]}.
    """
    _require_cuda("memory_snapshot")
    return torch.cuda.memory._snapshot()


def dump_memory_snapshot(path: str | Path) -> Path:
    """Pickle memory_snapshot() to path, for https://pytorch.org/memory_viz (drag the file onto the page)."""
    _require_cuda("dump_memory_snapshot")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.cuda.memory._dump_snapshot(os.fspath(path))
    return path


def _device_trace(snapshot: dict[str, Any], device: int | None) -> list[dict[str, Any]]:
    traces = snapshot.get("device_traces", [])
    if device is not None:
        return traces[device] if device < len(traces) else []
    used = [i for i, trace in enumerate(traces) if trace]
    if len(used) > 1:
        raise ValueError(f"the snapshot has events on devices {used}: pass device= to choose one")
    return traces[used[0]] if used else []


def memory_timeline(snapshot: dict[str, Any], device: int | None = None) -> np.ndarray:
    """Allocated bytes after each allocation or free of the trace, relative to when recording started.

    Memory is counted as allocated from "alloc" until "free_completed" (a block freed on one stream but
    still in use by another stays allocated until then). Blocks allocated before recording started and
    freed during it make the line go below zero.
    device: which GPU's trace; default the only one with events.
    """
    deltas = [
        e["size"] if e["action"] == "alloc" else -e["size"]
        for e in _device_trace(snapshot, device)
        if e["action"] in ("alloc", "free_completed")
    ]
    return np.cumsum(np.asarray(deltas, dtype=np.int64))


NO_PYTHON_FRAME = "no Python frame (autograd's backward thread, or C++)"


def _where(frames: list[dict[str, Any]]) -> str:
    """The innermost Python frame outside torch itself: the line of user code that asked for the memory.

    Allocations of the backward pass run on autograd's own thread, which has no Python stack.
    """
    for frame in frames:
        filename = frame.get("filename", "")
        if filename.endswith(".py") and f"{os.sep}torch{os.sep}" not in filename:
            return f"{Path(filename).name}:{frame.get('line')} {frame.get('name')}"
    return NO_PYTHON_FRAME


@dataclass(frozen=True)
class MemorySummary:
    """What a snapshot says, in numbers: what the allocator holds now, and what happened while recording."""

    reserved_bytes: int  # held from CUDA: the sum of segments (what nvidia-smi shows, minus the context)
    allocated_bytes: int  # in live tensors
    segments: int
    largest_free_block: int  # the largest tensor that fits without a new cudaMalloc
    events: int  # allocator events in the trace
    peak_delta_bytes: int  # the most memory allocated at once, above the level when recording started
    largest_allocations: tuple[tuple[int, str], ...]  # (bytes, where) of the largest allocations in the trace

    @property
    def fragmentation(self) -> float:
        """Reserved but free, as a fraction of reserved (0 when nothing is reserved)."""
        return 1 - self.allocated_bytes / self.reserved_bytes if self.reserved_bytes else 0.0

    def __str__(self) -> str:
        mib = 2**20
        lines = [
            f"reserved {self.reserved_bytes / mib:.1f} MiB in {self.segments} segments, allocated "
            f"{self.allocated_bytes / mib:.1f} MiB ({self.fragmentation:.0%} of reserved is free), largest "
            f"free block {self.largest_free_block / mib:.1f} MiB",
            f"{self.events} allocator events recorded; peak {self.peak_delta_bytes / mib:.1f} MiB above the start",
        ]
        lines += [f"  {size / mib:8.1f} MiB  {where}" for size, where in self.largest_allocations]
        return "\n".join(lines)


def summarize_snapshot(snapshot: dict[str, Any], device: int | None = None, k: int = 5) -> MemorySummary:
    """Summarise a memory_snapshot(): totals over its segments, the peak and the k largest allocations."""
    segments = snapshot.get("segments", [])
    free_blocks = [b["size"] for s in segments for b in s.get("blocks", []) if b.get("state") == "inactive"]
    trace = _device_trace(snapshot, device)
    allocs = sorted((e for e in trace if e["action"] == "alloc"), key=lambda e: e["size"], reverse=True)
    timeline = memory_timeline(snapshot, device)
    return MemorySummary(
        reserved_bytes=sum(s["total_size"] for s in segments),
        allocated_bytes=sum(s["allocated_size"] for s in segments),
        segments=len(segments),
        largest_free_block=max(free_blocks, default=0),
        events=len(trace),
        peak_delta_bytes=int(max(timeline.max(), 0)) if timeline.size else 0,
        largest_allocations=tuple((e["size"], _where(e.get("frames", []))) for e in allocs[:k]),
    )


# ----------------------------------------------------------------------------------------------------
# NVTX
# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """Mark a named range for Nsight Systems (`nsys profile python train.py` shows it on the timeline).

    On a machine without a CUDA GPU it does nothing: NVTX ranges only annotate CUDA timelines. To label a
    range in torch.profiler's traces instead (on any device), use torch.profiler.record_function(name).
    Usable as a decorator too: @nvtx_range("data").
    """
    if not torch.cuda.is_available():
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()
