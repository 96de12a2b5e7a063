"""A module-level profiler: how long each `nn.Module` takes in forward and in backward, step by step.

PyTorch calls hooks around every module call: a forward pre-hook before `forward`, a forward hook after it,
a full backward pre-hook when the gradient with respect to the module's outputs is ready, and a full backward
hook when the gradient with respect to its inputs is computed. Reading a clock in each pair gives one interval
per module call, and since a module's children run inside it, the intervals nest like the modules do.

Like `torch.profiler`, the profiler follows a schedule over training steps: skip the first steps, wait,
warm up, then record a few "active" steps, and optionally repeat. `step()` marks the end of a training step.
The result exports to the Chrome trace-event format, which https://ui.perfetto.dev and chrome://tracing open.

    prof = ModuleProfiler(model, schedule=schedule(wait=1, warmup=1, active=3))
    with prof:
        for x, y in batches:
            loss_fn(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            prof.step()
    prof.export_chrome_trace("trace.json")
    print(prof.totals())   # {(module name, "forward" or "backward"): total microseconds}

What the clock measures: host time between the hooks. On a GPU, kernels run asynchronously, so these are
launch times unless something synchronises (e.g. `torch.cuda.synchronize()` in your own code); on a CPU they are
the run times.

Limitation (from PyTorch's hooks): a module none of whose inputs requires grad (the first layer, fed with data)
has its full backward hook fire as soon as its output gradient is known, so its backward interval is empty.
Call `x.requires_grad_()` on the input to time it. Modules that modify their output in place (e.g.
`nn.ReLU(inplace=True)`) cannot take full backward hooks.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import nn
from torch.utils.hooks import RemovableHandle

Phase = Literal["wait", "warmup", "active"]
"""What the profiler does during a step: nothing ("wait", "warmup") or record ("active")."""


def schedule(
    *, wait: int, warmup: int, active: int, repeat: int = 0, skip_first: int = 0
) -> Callable[[int], Phase]:
    """Return a function from step number (0, 1, 2, ...) to phase, with `torch.profiler.schedule`'s semantics.

    The first `skip_first` steps are "wait". After them, steps go in cycles of `wait + warmup + active` steps:
    `wait` steps "wait", then `warmup` steps "warmup", then `active` steps "active". With `repeat > 0` there
    are `repeat` cycles and every later step is "wait"; with `repeat == 0` the cycles go on forever.

    (torch.profiler's RECORD and RECORD_AND_SAVE are both "active" here; its NONE is "wait".)

    Raises:
        ValueError: `active < 1` or any other argument negative.
    """
    # BEGIN SOLUTION: schedule: validate, then return a function mapping a step to its phase as torch.profiler.schedule does
    if active < 1 or min(wait, warmup, repeat, skip_first) < 0:
        raise ValueError(
            f"need active >= 1 and wait, warmup, repeat, skip_first >= 0; got wait={wait}, warmup={warmup}, "
            f"active={active}, repeat={repeat}, skip_first={skip_first}"
        )
    cycle = wait + warmup + active

    def phase(step: int) -> Phase:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < skip_first:
            return "wait"
        step -= skip_first
        if repeat > 0 and step >= repeat * cycle:
            return "wait"
        position = step % cycle
        if position < wait:
            return "wait"
        return "warmup" if position < wait + warmup else "active"

    return phase
    # END SOLUTION


@dataclass(frozen=True)
class TraceEvent:
    """One module call, in forward or in backward."""

    name: str
    """The module's qualified name in the model (`model.named_modules()`); the root module is named by its class."""
    cat: Literal["forward", "backward"]
    ts: float
    """Start, in microseconds since the profiler was entered."""
    dur: float
    """Duration in microseconds."""
    step: int
    """The step (number of `step()` calls before the call started) it belongs to."""
    tid: int
    """The native id of the thread that ran the hooks (`threading.get_native_id()`)."""


class ModuleProfiler:
    """Times every module of `model` in forward and backward, on the steps the schedule marks "active".

    Use it as a context manager: entering registers the four hooks on every module of `model` (itself
    included; each module once, as `named_modules()` lists them), leaving removes them all. Between the two,
    each call of a module that starts in an active step adds one `TraceEvent` per direction to `events` when
    it ends; nothing is recorded in other steps. A module called twice in a step gives two events.

    Args:
        model: the model to profile.
        schedule: maps a step number to a phase (see `schedule`); None records every step.
    """

    def __init__(self, model: nn.Module, schedule: Callable[[int], Phase] | None = None) -> None:
        self.model = model
        self.schedule = schedule
        self.step_num = 0
        """The current step: the number of `step()` calls so far."""
        self.events: list[TraceEvent] = []
        """The recorded events, in the order they ended."""
        self._handles: list[RemovableHandle] = []
        self._start_ns = 0
        # (name, cat) -> start times (ns) and steps of the calls in flight; a stack, since a module may be
        # re-entered before it returns (recursion, a shared module).
        self._open: dict[tuple[str, str], list[tuple[int, int]]] = {}

    def __enter__(self) -> ModuleProfiler:
        """Register the hooks on every module and start the clock. Returns the profiler."""
        # BEGIN SOLUTION: ModuleProfiler.__enter__: start the clock, register forward/backward pre- and post-hooks on every module
        self._start_ns = time.perf_counter_ns()
        for qualified_name, module in self.model.named_modules():
            name = qualified_name or type(module).__name__
            self._handles += [
                module.register_forward_pre_hook(lambda *_, name=name: self._begin(name, "forward")),
                module.register_forward_hook(lambda *_, name=name: self._end(name, "forward")),
                module.register_full_backward_pre_hook(lambda *_, name=name: self._begin(name, "backward")),
                module.register_full_backward_hook(lambda *_, name=name: self._end(name, "backward")),
            ]
        return self
        # END SOLUTION

    def _begin(self, name: str, cat: str) -> None:
        # BEGIN SOLUTION: ModuleProfiler._begin: if the current step is active, push the start time of this call
        phase = "active" if self.schedule is None else self.schedule(self.step_num)
        if phase == "active":
            self._open.setdefault((name, cat), []).append((time.perf_counter_ns(), self.step_num))
        # END SOLUTION

    def _end(self, name: str, cat: str) -> None:
        # BEGIN SOLUTION: ModuleProfiler._end: pop the call's start time (if it was recorded) and append a TraceEvent
        end_ns = time.perf_counter_ns()
        in_flight = self._open.get((name, cat))
        if not in_flight:  # the call started in a step that is not active
            return
        start_ns, step = in_flight.pop()
        self.events.append(
            TraceEvent(
                name=name,
                cat=cat,
                ts=(start_ns - self._start_ns) / 1e3,
                dur=(end_ns - start_ns) / 1e3,
                step=step,
                tid=threading.get_native_id(),
            )
        )
        # END SOLUTION

    def __exit__(self, *exc_info: object) -> None:
        """Remove every hook this profiler registered (the model is left as it was) and drop unfinished calls."""
        # BEGIN SOLUTION: ModuleProfiler.__exit__: remove all the hooks
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._open.clear()
        # END SOLUTION

    def step(self) -> None:
        """Mark the end of a training step: the schedule's next step begins."""
        # BEGIN SOLUTION: ModuleProfiler.step: advance the step counter
        self.step_num += 1
        # END SOLUTION

    def totals(self) -> dict[tuple[str, str], float]:
        """Total recorded time per module and direction: `{(name, cat): microseconds}`, summed over `events`."""
        # BEGIN SOLUTION: ModuleProfiler.totals: sum the durations of the events per (name, cat)
        totals: dict[tuple[str, str], float] = {}
        for event in self.events:
            totals[event.name, event.cat] = totals.get((event.name, event.cat), 0.0) + event.dur
        return totals
        # END SOLUTION

    def export_chrome_trace(self, path: str | Path) -> Path:
        """Write `events` as a Chrome trace-event JSON file that Perfetto opens; return its path.

        The file is one JSON object `{"traceEvents": [...], "displayTimeUnit": "ms"}`. Each event is a complete
        event: `{"name": ..., "cat": "forward" | "backward", "ph": "X", "ts": ..., "dur": ..., "pid": ...,
        "tid": ..., "args": {"step": ...}}` with `ts` and `dur` in microseconds (as in `TraceEvent`), `pid`
        this process's id (`os.getpid()`) and `tid` the event's thread id. Events of one thread nest like
        the module calls did, as the format requires of complete events.
        """
        # BEGIN SOLUTION: ModuleProfiler.export_chrome_trace: write the events as complete (ph X) events under traceEvents in a JSON file
        pid = os.getpid()
        trace_events = [
            {
                "name": event.name,
                "cat": event.cat,
                "ph": "X",
                "ts": event.ts,
                "dur": event.dur,
                "pid": pid,
                "tid": event.tid,
                "args": {"step": event.step},
            }
            for event in sorted(self.events, key=lambda event: (event.ts, -event.dur))
        ]
        path = Path(path)
        path.write_text(json.dumps({"traceEvents": trace_events, "displayTimeUnit": "ms"}))
        return path
        # END SOLUTION
