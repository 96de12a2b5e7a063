"""common.profiling: profiler schedule and trace, top ops, memory snapshot summaries, NVTX ranges."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import record_function

from common import profiling
from common.hardware import NoGPUError


def _two_matmuls(x: torch.Tensor) -> None:
    with record_function("slow_part"):
        time.sleep(0.02)  # a known lower bound on this label's self time: 20 ms per step
    (x @ x @ x).sum()


def test_profile_steps_records_only_the_active_steps_and_writes_a_trace(tmp_path: Path) -> None:
    x = torch.randn(64, 64)
    trace = tmp_path / "traces" / "step.json"
    prof = profiling.profile_steps(
        lambda: _two_matmuls(x), wait=2, warmup=1, active=3, trace_path=trace, cuda=False
    )
    ops = {op.name: op for op in profiling.top_ops(prof, k=100)}
    assert ops["aten::mm"].calls == 2 * 3  # two matmuls per step, three recorded steps
    assert ops["slow_part"].calls == 3
    assert ops["slow_part"].self_cpu_ms >= 3 * 20  # sleep(0.02) cannot take less than 20 ms
    assert not any(name.startswith("ProfilerStep") for name in ops)
    assert profiling.op_stats(prof)[("slow_part", "cpu")] == ops["slow_part"]  # a CPU profile: all rows "cpu"

    events = json.loads(trace.read_text())["traceEvents"]
    names = [e.get("name", "") for e in events]
    assert sum(n.startswith("ProfilerStep#") for n in names) == 3
    assert names.count("aten::mm") == 6


def test_top_ops_are_sorted_by_self_time_and_limited_to_k() -> None:
    x = torch.randn(64, 64)
    prof = profiling.profile_steps(lambda: _two_matmuls(x), wait=0, warmup=1, active=2, cuda=False)
    top = profiling.top_ops(prof, k=3)
    assert len(top) == 3
    assert [op.self_cpu_ms for op in top] == sorted((op.self_cpu_ms for op in top), reverse=True)
    everything = profiling.top_ops(prof, k=100)
    assert all(op.self_cpu_ms <= top[-1].self_cpu_ms for op in everything[3:])
    table = profiling.top_ops_table(prof, k=5, by="cpu")
    assert "slow_part" in table and "Self CPU" in table
    with pytest.raises(ValueError, match="by must be"):
        profiling.top_ops(prof, by="gpu")


class _FakeProfile:
    """What top_ops and op_stats read from a profiler: key_averages(), rows as a GPU profile has them."""

    def __init__(self, events: list[SimpleNamespace]) -> None:
        self.events = events

    def key_averages(self) -> list[SimpleNamespace]:
        return self.events


def _event(
    key: str, device: DeviceType, calls: int, self_cpu: float, cpu: float, self_dev: float, dev: float
):
    """A key_averages() row; times in microseconds, as torch.profiler reports them."""
    return SimpleNamespace(
        key=key,
        device_type=device,
        count=calls,
        self_cpu_time_total=self_cpu,
        cpu_time_total=cpu,
        self_device_time_total=self_dev,
        device_time_total=dev,
    )


def test_a_labels_cpu_and_gpu_rows_are_kept_apart() -> None:
    # A record_function label profiled on a GPU has two rows of one name: the host range (CPU time, and the
    # kernel time it launched as device total) and the GPU range (the span of its kernels, idle gaps included).
    prof = _FakeProfile(
        [
            _event("augment", DeviceType.CUDA, 3, 0.0, 0.0, 108_900.0, 108_900.0),
            _event("augment", DeviceType.CPU, 3, 9_000.0, 114_300.0, 0.0, 8_100.0),
            _event("aten::conv2d", DeviceType.CPU, 6, 500.0, 4_000.0, 0.0, 3_500.0),
            _event("cudaStreamSynchronize", DeviceType.CPU, 3, 12_000.0, 12_000.0, 0.0, 0.0),
            _event("ProfilerStep#2", DeviceType.CPU, 1, 10.0, 130_000.0, 0.0, 20_000.0),
        ]
    )
    ops = profiling.op_stats(prof)
    assert set(ops) == {
        ("augment", "cuda"),
        ("augment", "cpu"),
        ("aten::conv2d", "cpu"),
        ("cudaStreamSynchronize", "cpu"),
    }
    host, gpu = ops[("augment", "cpu")], ops[("augment", "cuda")]
    assert host.cpu_total_ms == pytest.approx(114.3) and host.device_total_ms == pytest.approx(8.1)
    assert gpu.device_total_ms == pytest.approx(108.9) and gpu.cpu_total_ms == 0
    assert host.key == ("augment", "cpu") and gpu.device == "cuda"
    top = profiling.top_ops(prof, k=10)  # by device time: the GPU range first, the host range still there
    assert top[0].key == ("augment", "cuda") and sorted(op.key for op in top) == sorted(ops)


def test_profiler_checks_its_schedule() -> None:
    with pytest.raises(ValueError, match="active >= 1"):
        profiling.profiler(active=0)


def test_memory_helpers_need_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NoGPUError, match="profile_memory=True"):
        profiling.memory_snapshot()
    with pytest.raises(NoGPUError), profiling.memory_history():
        pass
    with pytest.raises(NoGPUError):
        profiling.dump_memory_snapshot("unused.pickle")
    with pytest.raises(NoGPUError, match="cuda=True"):
        profiling.profiler(cuda=True)


def _frame(filename: str, line: int, name: str) -> dict:
    return {"filename": filename, "line": line, "name": name}


# A snapshot in the format torch.cuda.memory._snapshot() documents: two segments, and a trace in which a
# block allocated before recording started (0x10) is freed.
MiB = 2**20
USER = [
    _frame("/site-packages/torch/nn/modules/linear.py", 125, "forward"),
    _frame("/home/me/train.py", 42, "step"),
]
SNAPSHOT = {
    "segments": [
        {
            "address": 0x1000,
            "total_size": 20 * MiB,
            "allocated_size": 12 * MiB,
            "active_size": 12 * MiB,
            "stream": 0,
            "segment_type": "large",
            "blocks": [
                {
                    "address": 0x1000,
                    "size": 12 * MiB,
                    "requested_size": 12 * MiB,
                    "state": "active_allocated",
                },
                {"address": 0x2000, "size": 8 * MiB, "requested_size": 8 * MiB, "state": "inactive"},
            ],
        },
        {
            "address": 0x9000,
            "total_size": 2 * MiB,
            "allocated_size": 0,
            "active_size": 0,
            "stream": 0,
            "segment_type": "small",
            "blocks": [{"address": 0x9000, "size": 2 * MiB, "requested_size": 0, "state": "inactive"}],
        },
    ],
    "device_traces": [
        [],
        [
            {"action": "alloc", "addr": 0x1000, "size": 12 * MiB, "stream": 0, "frames": USER},
            {"action": "alloc", "addr": 0x2000, "size": 8 * MiB, "stream": 0, "frames": []},
            {"action": "free_requested", "addr": 0x2000, "size": 8 * MiB, "stream": 0, "frames": []},
            {"action": "free_completed", "addr": 0x2000, "size": 8 * MiB, "stream": 0, "frames": []},
            {"action": "free_completed", "addr": 0x10, "size": 16 * MiB, "stream": 0, "frames": []},
            {"action": "segment_alloc", "addr": 0x9000, "size": 2 * MiB, "stream": 0, "frames": []},
        ],
    ],
}


def test_memory_timeline_counts_from_alloc_to_free_completed() -> None:
    timeline = profiling.memory_timeline(SNAPSHOT)  # the only device with events: device 1
    assert (timeline // MiB).tolist() == [12, 20, 12, -4]
    assert profiling.memory_timeline(SNAPSHOT, device=0).size == 0


def test_summarize_snapshot() -> None:
    summary = profiling.summarize_snapshot(SNAPSHOT, k=1)
    assert summary.reserved_bytes == 22 * MiB and summary.allocated_bytes == 12 * MiB
    assert summary.segments == 2 and summary.largest_free_block == 8 * MiB
    assert summary.fragmentation == pytest.approx(10 / 22)
    assert summary.events == 6 and summary.peak_delta_bytes == 20 * MiB
    assert summary.largest_allocations == ((12 * MiB, "train.py:42 step"),)  # torch's own frame skipped
    assert "20.0 MiB above the start" in str(summary)

    two_devices = {"segments": [], "device_traces": [SNAPSHOT["device_traces"][1]] * 2}
    with pytest.raises(ValueError, match=r"devices \[0, 1\]: pass device="):
        profiling.summarize_snapshot(two_devices)
    assert profiling.summarize_snapshot(two_devices, device=0).peak_delta_bytes == 20 * MiB
    empty = profiling.summarize_snapshot({"segments": [], "device_traces": []})
    assert empty.peak_delta_bytes == 0 and empty.fragmentation == 0.0


def test_nvtx_range_is_a_no_op_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def must_not_be_called(*args: object) -> None:
        raise AssertionError("NVTX called without a GPU")

    monkeypatch.setattr(torch.cuda.nvtx, "range_push", must_not_be_called)
    with profiling.nvtx_range("data"):
        value = 1 + 1

    @profiling.nvtx_range("forward")
    def forward() -> int:
        return value * 2

    assert forward() == 4


@pytest.mark.gpu
def test_nvtx_range_pushes_and_pops_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: calls.append(("push", name)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append(("pop",)))
    with pytest.raises(RuntimeError), profiling.nvtx_range("step"):
        raise RuntimeError("popped even on error")
    assert calls == [("push", "step"), ("pop",)]


@pytest.mark.gpu
def test_profile_of_a_gpu_step_records_kernel_time() -> None:
    x = torch.randn(2048, 2048, device="cuda")
    prof = profiling.profile_steps(lambda: x @ x, wait=1, warmup=1, active=2)
    top = profiling.top_ops(prof, k=5)
    assert top[0].self_device_ms > 0  # sorted by device time when kernels were recorded
    assert "Self CUDA" in profiling.top_ops_table(prof) or "Self Device" in profiling.top_ops_table(prof)


@pytest.mark.gpu
def test_memory_snapshot_of_a_training_step_accounts_for_the_peak(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024)).cuda()
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(512, 1024, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with profiling.memory_history():
        for _ in range(2):  # the first step also allocates gradients and AdamW's state
            opt.zero_grad(set_to_none=True)
            model(x).pow(2).mean().backward()
            opt.step()
        torch.cuda.synchronize()
        snapshot = profiling.memory_snapshot()
        path = profiling.dump_memory_snapshot(tmp_path / "snap.pickle")
    summary = profiling.summarize_snapshot(snapshot, device=torch.cuda.current_device())
    expected_peak = torch.cuda.max_memory_allocated() - base
    # The trace sees every alloc and free since recording started, so its running sum reaches the same
    # peak as the allocator's counter; 1% allows for allocator-internal blocks.
    assert summary.peak_delta_bytes == pytest.approx(expected_peak, rel=0.01)
    assert summary.allocated_bytes == pytest.approx(torch.cuda.memory_allocated(), rel=0.01)
    wheres = [where for _, where in summary.largest_allocations]
    assert any("test_profiling.py" in where for where in wheres), wheres  # AdamW's state, from opt.step()
    assert "segments" in pickle.loads(path.read_bytes())


@pytest.mark.gpu
def test_a_label_on_a_gpu_has_a_host_row_and_a_gpu_row() -> None:
    x = torch.randn(1024, 1024, device="cuda")

    def step() -> None:
        with record_function("label"):
            x @ x
            time.sleep(0.005)  # the GPU idles between the two matmuls
            x @ x

    ops = profiling.op_stats(profiling.profile_steps(step, wait=0, warmup=1, active=2))
    host, gpu = ops[("label", "cpu")], ops[("label", "cuda")]
    assert host.calls == gpu.calls == 2 and host.cpu_total_ms >= 2 * 5
    # The GPU row spans first kernel to last, the idle 5 ms included; the host row's device total is kernel time.
    assert gpu.device_total_ms > 2 * 4 > host.device_total_ms > 0


# ------------------------------------------------------------------------------------- overlap in a trace
def _kernel(name: str, stream: int, start: float, end: float) -> dict:
    """A kernel event as torch.profiler exports it (only the fields the reader uses, plus a few it ignores)."""
    return {"ph": "X", "cat": "kernel", "name": name, "pid": 0, "tid": stream, "ts": start, "dur": end - start,
            "args": {"device": 0, "stream": stream, "correlation": 1}}  # fmt: skip


def _range(name: str, start: float, end: float) -> dict:
    return {
        "ph": "X",
        "cat": "user_annotation",
        "name": name,
        "pid": 1,
        "tid": 1,
        "ts": start,
        "dur": end - start,
    }


GATHER = "ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)"
NCCL, COMPUTE, OTHER = 20, 7, 13  # streams: NCCL's, the default one, a second compute stream


def _covered_on_a_grid(span: profiling.Span, others: list[profiling.Span]) -> float:
    """The reference for covered_us on integer times: count the unit cells of span inside any of the others."""
    cells = np.arange(span.start_us, span.end_us) + 0.5
    inside = np.zeros(cells.shape, dtype=bool)
    for o in others:
        inside |= (cells > o.start_us) & (cells < o.end_us)
    return float(inside.sum())


def test_covered_time_is_the_union_of_the_others_clipped_to_the_span() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        start = int(rng.integers(0, 50))
        span = profiling.Span("x", start, start + int(rng.integers(1, 60)))
        others = []
        for _ in range(int(rng.integers(0, 6))):
            a = int(rng.integers(0, 100))
            others.append(profiling.Span("y", a, a + int(rng.integers(1, 40))))
        assert profiling.covered_us(span, others) == _covered_on_a_grid(span, others), (span, others)


def test_a_gather_beside_compute_on_another_stream_is_covered() -> None:
    trace = {"traceEvents": [
        _range("forward#0", 0, 1000),
        _kernel(GATHER, NCCL, 100, 200),
        _kernel("ampere_bf16_gemm", COMPUTE, 50, 150),   # covers 100..150
        _kernel("flash_fwd_kernel", COMPUTE, 160, 300),  # covers 160..200
    ]}  # fmt: skip
    (kernel,) = profiling.comm_overlap(trace, comm="AllGather", ranges=["forward#0"])["forward#0"]
    assert (kernel.name, kernel.stream, kernel.duration_us, kernel.covered_us) == (GATHER, NCCL, 100, 90)
    assert kernel.covered_fraction == pytest.approx(0.9)


def test_serial_gathers_are_not_covered_and_the_same_stream_never_covers() -> None:
    trace = {"traceEvents": [
        _range("forward#0", 0, 1000),
        _kernel("gemm", COMPUTE, 0, 100),
        _kernel(GATHER, COMPUTE, 100, 200),  # a gather on the compute stream, between two kernels
        _kernel("gemm", COMPUTE, 200, 300),
        _kernel(GATHER, NCCL, 300, 400),     # a gather on its stream, while nothing computes
        _kernel("gemm", NCCL, 300, 400),     # (not possible on one stream: shows it is not counted)
        _kernel("gemm", COMPUTE, 400, 500),
    ]}  # fmt: skip
    kernels = profiling.comm_overlap(trace, comm="AllGather", ranges=["forward#0"])["forward#0"]
    assert [(k.stream, k.covered_us) for k in kernels] == [(COMPUTE, 0), (NCCL, 0)]


def test_compute_on_several_streams_counts_once_and_other_collectives_are_not_compute() -> None:
    trace = {"traceEvents": [
        _range("backward#0", 0, 1000),
        _kernel(GATHER, NCCL, 100, 300),
        _kernel("gemm", COMPUTE, 0, 250),                          # covers 100..250
        _kernel("gemm", OTHER, 120, 200),                          # nested in it: adds nothing
        _kernel("gemm", OTHER, 240, 260),                          # adds 250..260
        _kernel("ncclDevKernel_ReduceScatter_Sum", 30, 260, 300),  # communication, not compute
    ]}  # fmt: skip
    (kernel,) = profiling.comm_overlap(trace, comm="AllGather", ranges=["backward#0"])["backward#0"]
    assert kernel.covered_us == 160 and kernel.covered_fraction == pytest.approx(0.8)


def test_kernels_belong_to_the_range_they_start_in_and_missing_ones_are_said() -> None:
    trace = {"traceEvents": [
        _range("forward#0", 0, 100),
        _range("backward#0", 200, 300),
        _kernel(GATHER, NCCL, 50, 90),
        _kernel(GATHER, NCCL, 150, 180),  # between the ranges: in neither
        _kernel("gemm", COMPUTE, 60, 70),
    ]}  # fmt: skip
    overlaps = profiling.comm_overlap(trace, comm="AllGather", ranges=["forward#0", "backward#0"])
    assert [k.covered_us for k in overlaps["forward#0"]] == [10] and overlaps["backward#0"] == []
    assert profiling.comm_overlap(trace, comm="ReduceScatter", ranges=["forward#0"]) == {"forward#0": []}
    with pytest.raises(ValueError, match="'forward#1' 0 times"):
        profiling.comm_overlap(trace, comm="AllGather", ranges=["forward#1"])
    without_stream = {"traceEvents": [{**_kernel("gemm", COMPUTE, 0, 1), "args": {}}]}
    with pytest.raises(ValueError, match="'gemm' at 0 us has no 'stream'"):
        profiling.trace_spans(without_stream, "kernel")
    with pytest.raises(ValueError, match="not a Chrome trace"):
        profiling.trace_spans({"events": []}, "kernel")


def test_record_function_ranges_are_read_from_a_real_trace(tmp_path: Path) -> None:
    x = torch.randn(32, 32)
    steps = iter(range(3))

    def step() -> None:
        k = next(steps)
        with record_function(f"forward#{k}"):
            time.sleep(0.002)  # a range cannot last less than this: 2 ms
            x @ x

    path = tmp_path / "trace.json"
    profiling.profile_steps(step, wait=0, warmup=1, active=2, trace_path=path, cuda=False)
    trace = json.loads(path.read_text())
    ranges = [s for s in profiling.trace_spans(trace, "user_annotation") if s.name.startswith("forward#")]
    assert [s.name for s in ranges] == ["forward#1", "forward#2"]  # the warm-up step is not recorded
    assert all(s.end_us - s.start_us >= 2000 for s in ranges) and ranges[0].end_us <= ranges[1].start_us
    assert profiling.trace_spans(trace, "kernel") == []  # a CPU profile records no kernels
    assert profiling.comm_overlap(trace, comm="AllGather", ranges=["forward#2"]) == {"forward#2": []}
