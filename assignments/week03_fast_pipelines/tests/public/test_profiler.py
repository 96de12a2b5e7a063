"""Public tests of `fastpipe.profiler`; the hidden tests also compare your times with torch.profiler's."""

from __future__ import annotations

import json
import time

import torch
from fastpipe.profiler import ModuleProfiler, schedule
from torch import nn
from torch.profiler import ProfilerAction


def test_schedule_matches_torch_profiler() -> None:
    kwargs = dict(wait=1, warmup=1, active=2, repeat=2, skip_first=1)
    ours, theirs = schedule(**kwargs), torch.profiler.schedule(**kwargs)
    names = {ProfilerAction.NONE: "wait", ProfilerAction.WARMUP: "warmup"}
    assert [ours(step) for step in range(12)] == [names.get(theirs(step), "active") for step in range(12)]


class Nap(nn.Module):
    """Sleeps 2 ms in forward: a known duration to check the units."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.002)
        return x * 2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Sequential(Nap(), nn.Tanh()), nn.Linear(4, 1))


def test_events_for_active_steps(tmp_path) -> None:
    model = make_model()
    profiler = ModuleProfiler(model, schedule=schedule(wait=1, warmup=1, active=1, repeat=1))
    with profiler:
        for _ in range(4):
            model(torch.randn(3, 4, requires_grad=True)).sum().backward()
            profiler.step()
    names = {"Sequential", "0", "1", "1.0", "1.1", "2"}
    assert {(e.name, e.cat) for e in profiler.events} == {
        (n, c) for n in names for c in ("forward", "backward")
    }
    assert {e.step for e in profiler.events} == {2}
    by_name = {(e.name, e.cat): e for e in profiler.events}
    nap, block = by_name["1.0", "forward"], by_name["1", "forward"]
    assert nap.dur >= 2000, "durations are in microseconds; Nap sleeps 2 ms"
    assert block.ts <= nap.ts and nap.ts + nap.dur <= block.ts + block.dur + 1e-3, (
        "a child lies inside its parent"
    )
    assert profiler.totals()["1.0", "forward"] == nap.dur

    trace = json.loads(profiler.export_chrome_trace(tmp_path / "trace.json").read_text())
    assert len(trace["traceEvents"]) == len(profiler.events)
    assert all(e["ph"] == "X" and e["cat"] in ("forward", "backward") for e in trace["traceEvents"])
