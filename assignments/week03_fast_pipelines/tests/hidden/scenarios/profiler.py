"""Runs in the submission's worker: the student's ModuleProfiler on small models. Observations only.

The models are defined here, so the checker can build the same ones and know every module's name. An event
comes back as a tuple (name, cat, ts, dur, step, tid); the tests decide whether the events are right.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16),
        nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16)),
        nn.GELU(),
        nn.Linear(16, 1),
    )


class SleepFunction(torch.autograd.Function):
    """Identity whose forward and backward sleep a known time inside a record_function range."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, label: str, forward_s: float, backward_s: float) -> torch.Tensor:
        ctx.label, ctx.backward_s = label, backward_s
        with record_function(f"forward.{label}"):
            time.sleep(forward_s)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        with record_function(f"backward.{ctx.label}"):
            time.sleep(ctx.backward_s)
        return grad.clone(), None, None, None


class Sleeper(nn.Module):
    def __init__(self, label: str, forward_s: float, backward_s: float) -> None:
        super().__init__()
        self.label, self.forward_s, self.backward_s = label, forward_s, backward_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SleepFunction.apply(x, self.label, self.forward_s, self.backward_s)


class SleepyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(Sleeper("encoder.0", 0.004, 0.010), Sleeper("encoder.1", 0.012, 0.003))
        self.head = Sleeper("head", 0.006, 0.008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.encoder(x)))


class Twice(nn.Module):
    """Calls one shared Linear twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(torch.tanh(self.shared(x)))


def _events(profiler) -> list[tuple]:
    return [(e.name, e.cat, e.ts, e.dur, e.step, e.tid) for e in profiler.events]


def _profiler(model: nn.Module, schedule_kwargs: dict | None):
    from fastpipe.profiler import ModuleProfiler, schedule

    return ModuleProfiler(model, schedule=None if schedule_kwargs is None else schedule(**schedule_kwargs))


def phases(schedule_kwargs: dict, steps: int) -> list:
    """`schedule(**schedule_kwargs)` at steps 0 .. steps - 1."""
    from fastpipe.profiler import schedule

    phase = schedule(**schedule_kwargs)
    return [phase(step) for step in range(steps)]


def profile_mlp(schedule_kwargs: dict | None, steps: int) -> dict:
    """`steps` training steps of `mlp()` (inputs that require grad) under the profiler."""
    from fastpipe.profiler import TraceEvent

    model = mlp()
    profiler = _profiler(model, schedule_kwargs)
    with profiler:
        for _ in range(steps):
            model(torch.randn(4, 8, requires_grad=True)).sum().backward()
            profiler.step()
    return {
        "events": _events(profiler),
        "trace_events": all(isinstance(e, TraceEvent) for e in profiler.events),
    }


def profile_with_torch_profiler() -> dict:
    """SleepyNet for 5 steps under both profilers, each with schedule(wait=1, warmup=1, active=2, repeat=1).

    Returns the student's totals() and events, and torch.profiler's total time per record_function range.
    """
    model = SleepyNet()
    ours = _profiler(model, dict(wait=1, warmup=1, active=2, repeat=1))
    reference: dict[str, float] = {}

    def collect(prof: profile) -> None:
        for event in prof.events():
            if event.name.startswith(("forward.", "backward.")):
                reference[event.name] = reference.get(event.name, 0.0) + event.time_range.elapsed_us()

    with (
        profile(
            activities=[ProfilerActivity.CPU],
            schedule=torch.profiler.schedule(wait=1, warmup=1, active=2, repeat=1),
            on_trace_ready=collect,
        ) as theirs,
        ours,
    ):
        for _ in range(5):
            model(torch.ones(3, requires_grad=True)).sum().backward()
            ours.step()
            theirs.step()
    return {"totals": ours.totals(), "events": _events(ours), "torch_profiler": reference}


def export_trace(folder: str) -> dict:
    """SleepyNet for 3 steps with schedule(wait=0, warmup=0, active=1, repeat=2), exported to a trace file."""
    model = SleepyNet()
    profiler = _profiler(model, dict(wait=0, warmup=0, active=1, repeat=2))
    with profiler:
        for _ in range(3):
            model(torch.ones(2, requires_grad=True)).sum().backward()
            profiler.step()
    path = Path(folder) / "trace.json"
    returned = profiler.export_chrome_trace(path)
    return {
        "returned": str(returned),
        "returned_a_path": isinstance(returned, Path),
        "path": str(path),
        "text": path.read_text(),
        "events": _events(profiler),
        "pid": os.getpid(),
    }


def hooks_after_an_error() -> dict:
    """An error inside the profiler's with block; then the hooks left behind and events recorded after it."""
    model = mlp()
    profiler = _profiler(model, None)
    raised = None
    try:
        with profiler:
            model(torch.randn(4, 8, requires_grad=True)).sum().backward()
            profiler.step()
            raise KeyError("an error inside the with block")
    except KeyError as error:
        raised = json.dumps(str(error))
    recorded = len(profiler.events)
    hooks = sum(
        len(hooks)
        for module in model.modules()
        for hooks in (
            module._forward_pre_hooks,
            module._forward_hooks,
            module._backward_pre_hooks,
            module._backward_hooks,
        )
    )
    model(torch.randn(2, 8, requires_grad=True)).sum().backward()
    return {"raised": raised, "recorded": recorded, "hooks_left": hooks, "events_after": len(profiler.events)}


def profile_twice() -> list[tuple]:
    """One step of `Twice`: its shared Linear runs twice."""
    model = Twice()
    profiler = _profiler(model, None)
    with profiler:
        model(torch.randn(3, 4, requires_grad=True)).sum().backward()
    return _events(profiler)
