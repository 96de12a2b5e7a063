"""Offloading: keep what the GPU does not need this moment in host memory, and copy it back in time.

    offload = apply_parameter_offload(model, "cuda")      # Block weights live in pinned host memory
    optimizer = HostOptimizer(offload.parameters(), lr=3e-4)  # AdamW states and update on the host
    with offload_activations(model):                      # saved activations go to the host too
        model.loss(tokens, targets).backward()
    optimizer.step()
    offload.remove()                                      # the plain model again, weights on the GPU

What you will learn:

- Host memory is large and cheap, but PCIe (or NVLink-C2C) is 10-100x slower than HBM: offloading pays
  only when each copy hides behind compute. So block i+1's weights are copied on a side CUDA stream while
  block i computes (prefetch), and the compute stream waits for the copy's event, not for the whole GPU.
  Gradients travel back on a second side stream: PCIe carries both directions at once, and neither
  direction's copies then wait in line behind compute.
- Pinned (page-locked) host memory is what makes a host-to-device copy asynchronous: from pageable
  memory the driver first copies into a pinned staging buffer, and the copy blocks the host.
- The caching allocator is stream-ordered: memory freed on a stream goes back to that stream's pool at
  once, when the host frees it, and kernels queued later on that stream run after the ones that used it.
  So block weights are allocated on the compute stream, and the copy stream first waits for the compute
  stream (an event, not a host sync), so it never writes memory that queued kernels still read. Frees
  then take effect in host order, and at most two blocks are allocated however far the host runs ahead
  of the GPU. Allocating on the copy stream with record_stream(compute) is the other way to make the
  free safe, but it defers every free until the GPU catches up: memory grows when the host runs ahead,
  the problem FSDP1 met and capped with a rate limiter.
- A weight can be "offloaded" while autograd still holds it for backward: the parameter keeps its
  storage object, whose memory is released (resize_(0)) after the block's forward and refilled from the
  host before the block's backward, the trick FSDP uses for its sharded parameters.
- Activations offload through torch.autograd.graph.saved_tensors_hooks: pack copies a saved tensor to
  the host, unpack copies it back; torch.autograd.graph.save_on_cpu is PyTorch's own version of it.

Everything also runs with device "cpu": no streams, every copy is a plain copy, which is how the tests
prove on a CPU that each technique gives the plain model's results.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.bench import BenchResult, bench
from common.memory.checkpointing import CheckpointedBlock
from common.models.llama import Block, Llama, LlamaConfig, random_batch
from common.profiling import Interval, interval_union, profile_steps, total_length

__all__ = [
    "HostOptimizer",
    "OffloadMeasurement",
    "Overlap",
    "ParameterOffload",
    "apply_parameter_offload",
    "measure_offload",
    "offload_activations",
    "overlap",
    "record_timeline",
]

_OFFLOADED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _resolve(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device={str(device)!r}: offloading copies between the host and 'cuda' (or 'cpu')")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _host_copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """A copy of t in host memory, pinned if asked (a pinned buffer makes copies to the GPU asynchronous)."""
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
    host.copy_(t.detach())
    return host


# ----------------------------------------------------------------------------------------------------
# Parameters in host memory, streamed to the device block by block
# ----------------------------------------------------------------------------------------------------


class ParameterOffload:
    """Keeps every Block's parameters on the host; hooks copy a block's in for its forward and backward.

    Made by apply_parameter_offload. Between uses a block parameter keeps its shape but holds no device
    memory (its storage is resized to 0 bytes); its values live in a host "master" tensor. Gradients of
    block parameters land on the masters (master.grad), so the optimizer steps the masters:
    parameters() yields them with the model's other, device-resident parameters.
    """

    def __init__(self, model: nn.Module, device: torch.device | str, prefetch: bool = True) -> None:
        self.model = model
        self.device = _resolve(device)
        self.prefetch = prefetch
        self.blocks: list[nn.Module] = [m for m in model.modules() if isinstance(m, Block)]
        on_cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if on_cuda else None  # weights, host to device
        self.grad_stream = torch.cuda.Stream(self.device) if on_cuda else None  # gradients, device to host
        names = {p: name for name, p in model.named_parameters()}
        self.params: list[list[nn.Parameter]] = [list(b.parameters()) for b in self.blocks]
        self.masters: dict[str, torch.Tensor] = {}
        self._master: dict[nn.Parameter, torch.Tensor] = {}
        self._staged: dict[nn.Parameter, torch.Tensor] = {}  # this backward's gradients, on the host
        for p in (p for ps in self.params for p in ps):
            self._master[p] = self.masters[names[p]] = _host_copy(p, pin=on_cuda)
            p.data = torch.empty(p.shape, dtype=p.dtype, device=self.device)
            p.untyped_storage().resize_(0)  # the parameter object stays; its device memory goes
        model.to(self.device)  # everything outside the blocks lives on the device
        self._ready: list[torch.cuda.Event | bool | None] = [None] * len(self.blocks)  # None: not on device
        self._grads_pending = [0] * len(self.blocks)
        self._arrived: set[nn.Parameter] = set()  # block parameters whose gradient came this backward
        self._callback_queued = False
        self._handles: list[Any] = []
        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(functools.partial(self._pre_forward, i)))
            self._handles.append(block.register_forward_hook(functools.partial(self._post_forward, i)))
            for p in self.params[i]:
                self._handles.append(
                    p.register_post_accumulate_grad_hook(functools.partial(self._post_grad, i))
                )
        _OFFLOADED.add(model)

    # -- copies ---------------------------------------------------------------------------------------

    def _copy_stream(self) -> contextlib.AbstractContextManager[Any]:
        return (
            torch.cuda.stream(self.copy_stream) if self.copy_stream is not None else contextlib.nullcontext()
        )

    def _fetch(self, i: int) -> None:
        """Start copying block i's parameters to the device (on the copy stream, if there is one)."""
        if self._ready[i] is not None:
            return
        for p in self.params[i]:
            # Allocated on the compute stream (the current one), so it may be memory another block freed
            # a moment ago, which kernels already queued there still read ...
            p.untyped_storage().resize_(p.numel() * p.element_size())
        if self.copy_stream is not None:
            # ... so the copy waits for them. It then runs while the kernels queued after this point
            # (block i - 1's, when prefetching) compute.
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with self._copy_stream():
            for p in self.params[i]:
                # Through .data: refilling the storage must not bump the version counter autograd checks
                # on the weights it saved for backward.
                p.data.copy_(self._master[p], non_blocking=True)
            if self.copy_stream is not None:
                event = torch.cuda.Event()
                event.record(self.copy_stream)
                self._ready[i] = event
            else:
                self._ready[i] = True

    def _wait(self, i: int) -> None:
        """Make the compute stream wait for block i's copy (the GPU waits; the host goes on queueing)."""
        self._fetch(i)
        ready = self._ready[i]
        if isinstance(ready, torch.cuda.Event):
            torch.cuda.current_stream(self.device).wait_event(ready)
            self._ready[i] = True

    def _free(self, i: int) -> None:
        for p in self.params[i]:
            p.untyped_storage().resize_(0)
        self._ready[i] = None

    # -- hooks ----------------------------------------------------------------------------------------

    def _pre_forward(self, i: int, module: nn.Module, args: Any) -> None:
        self._wait(i)
        if self.prefetch and i + 1 < len(self.blocks):
            self._fetch(i + 1)  # copies while block i computes

    def _post_forward(self, i: int, module: nn.Module, args: Any, output: Any) -> None:
        self._free(i)
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(functools.partial(self._pre_backward, i))

    def _pre_backward(self, i: int, grad: torch.Tensor) -> None:
        """Runs when the gradient of block i's output is ready: just before the block's backward."""
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._post_backward)
            self._callback_queued = True
        self._wait(i)
        self._grads_pending[i] = len(self.params[i])
        if self.prefetch and i > 0:
            self._fetch(i - 1)  # backward walks the blocks in reverse

    def _post_grad(self, i: int, p: nn.Parameter) -> None:
        """Runs once p.grad holds p's gradient: send it to the host, free the block when all have come.

        The copy runs on a stream of its own, after the kernel that wrote the gradient, so it overlaps the
        next blocks' backward (and the weight copies, which go the other way over PCIe). The gradient's
        device memory must outlive the copy: record_stream makes the allocator hold it until the work
        queued on grad_stream so far is done. That is the deferred free the module docstring warns about,
        bounded here: at worst every block's gradient at once, the memory a plain model's gradients take.
        The host buffer is pinned (so the copy is asynchronous) and comes from PyTorch's caching host
        allocator, which hands a freed buffer out again once the copies that used it are done.
        """
        grad = p.grad
        staged = torch.empty_like(self._master[p], pin_memory=self.grad_stream is not None)
        if self.grad_stream is not None:
            self.grad_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.grad_stream):
                staged.copy_(grad, non_blocking=True)
            grad.record_stream(self.grad_stream)
        else:
            staged.copy_(grad)
        self._staged[p] = staged
        p.grad = None
        self._arrived.add(p)
        self._grads_pending[i] -= 1
        if self._grads_pending[i] == 0:
            self._free(i)

    def _post_backward(self) -> None:
        """End of backward: wait for the gradient copies, then add them to the masters' gradients."""
        self._callback_queued = False
        if self.grad_stream is not None:
            torch.cuda.synchronize(self.device)  # a host-device sync: the host reads the gradients next
        for p in self._arrived:
            master, staged = self._master[p], self._staged.pop(p)
            # The first gradient is the host buffer itself: no copy of a model's worth of gradients.
            master.grad = staged if master.grad is None else master.grad.add_(staged)
        self._arrived.clear()
        for i in range(len(self.blocks)):
            if self._ready[i] is not None:  # a block some of whose parameters got no gradient
                self._free(i)

    # -- the user's side ------------------------------------------------------------------------------

    def parameters(self) -> Iterator[torch.Tensor]:
        """What an optimizer should update: the host masters of block parameters, and all other parameters."""
        offloaded = set(self._master)
        for p in self.model.parameters():
            yield self._master[p] if p in offloaded else p

    def remove(self) -> nn.Module:
        """Undo the offload: hooks removed, block parameters (and gradients) back on the device."""
        while self._handles:
            self._handles.pop().remove()
        for p, master in self._master.items():
            p.data = master.to(self.device)
            p.grad = master.grad.to(self.device) if master.grad is not None else None
        _OFFLOADED.discard(self.model)
        return self.model


def apply_parameter_offload(
    model: nn.Module, device: torch.device | str, *, prefetch: bool = True
) -> ParameterOffload:
    """Keep every Block's parameters in (pinned) host memory and stream them to `device` block by block.

    Everything outside the blocks (embeddings, final norm, output layer, buffers) moves to `device`. At
    most two blocks' parameters are on the device at once with prefetch (the one computing and the next),
    one without. prefetch=False copies each block only when it is about to run, so compute waits for it:
    the baseline that shows what prefetch hides. Returns the ParameterOffload; its remove() undoes it.
    """
    device = _resolve(device)
    if model in _OFFLOADED:
        raise ValueError(
            f"{type(model).__name__} is offloaded already; call .remove() on its ParameterOffload first"
        )
    if any(isinstance(m, CheckpointedBlock) for m in model.modules()):
        raise ValueError(
            "parameter offload's hooks would fire again when checkpointing recomputes a block during "
            "backward, and free its weights mid-backward; apply one or the other, not both"
        )
    if not any(isinstance(m, Block) for m in model.modules()):
        raise TypeError(
            f"apply_parameter_offload streams the Blocks of a model, and {type(model).__name__} has none; "
            "pass a common.models.llama.Llama"
        )
    return ParameterOffload(model, device, prefetch)


# ----------------------------------------------------------------------------------------------------
# Optimizer states in host memory
# ----------------------------------------------------------------------------------------------------


class HostOptimizer:
    """An optimizer (AdamW by default) whose states and update live in host memory.

    Parameters already in pinned host memory (ParameterOffload's masters) are stepped in place. Every
    other parameter gets a host copy: step() copies its gradient to the host, updates the copy there, and
    copies the new values back. AdamW keeps two states per parameter (exp_avg, exp_avg_sq), twice the
    parameters' memory, which this keeps off the GPU; the price is a CPU update and two copies a step.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor] | Iterator[torch.Tensor],
        optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
        **kwargs: Any,
    ) -> None:
        self.params = list(params)
        self.hosts = [
            p if p.device.type == "cpu" and p.is_pinned() else _host_copy(p, pin=p.is_cuda)
            for p in self.params
        ]
        self.optimizer = optimizer_cls(self.hosts, **kwargs)

    def step(self) -> None:
        for p, host in zip(self.params, self.hosts, strict=True):
            if host is not p:
                # A blocking copy: the host needs the gradient before it can update.
                host.grad = p.grad.to("cpu") if p.grad is not None else None
        self.optimizer.step()
        for p, host in zip(self.params, self.hosts, strict=True):
            if host is not p:
                with torch.no_grad():
                    p.copy_(host, non_blocking=True)

    def zero_grad(self) -> None:
        for t in (*self.params, *self.hosts):
            t.grad = None

    def state_bytes(self, device_type: str = "cpu") -> int:
        """Bytes of optimizer state on that kind of device (all of it on "cpu", none on "cuda")."""
        return sum(
            v.numel() * v.element_size()
            for state in self.optimizer.state.values()
            for v in state.values()
            if isinstance(v, torch.Tensor) and v.device.type == device_type
        )


# ----------------------------------------------------------------------------------------------------
# Activations in host memory
# ----------------------------------------------------------------------------------------------------


class offload_activations(torch.autograd.graph.saved_tensors_hooks):  # noqa: N801 (a context manager)
    """Inside `with offload_activations(model):`, tensors saved for backward are kept in host memory.

    pack copies each saved tensor to a (pinned) host buffer and returns the buffer; unpack copies it back
    to its device when backward needs it. Both copies are queued on the current stream, so the stream's
    order makes them safe (the device tensor is freed once pack returns; its memory is reused only by
    kernels queued after the copy). Unlike torch.autograd.graph.save_on_cpu, weights of `model` are not
    copied: they stay on the device anyway, and copying them would cost bandwidth and host memory.
    bytes_offloaded counts what went to the host.
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        self.keep = {p.untyped_storage()._cdata for p in model.parameters()} if model is not None else set()
        self.pin = torch.cuda.is_available()
        self.bytes_offloaded = 0
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> offload_activations:
        super().__enter__()
        return self

    def _pack(self, t: torch.Tensor) -> Any:
        if t.untyped_storage()._cdata in self.keep:
            return t
        host = torch.empty(
            t.shape, dtype=t.dtype, layout=t.layout, device="cpu", pin_memory=self.pin and t.is_cuda
        )
        host.copy_(t, non_blocking=True)
        self.bytes_offloaded += host.numel() * host.element_size()
        return t.device, host

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------------
# Timeline: do copies hide behind compute?
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Overlap:
    """Busy time of copies and of compute kernels on the GPU, and how much of the two ran at once (ms)."""

    copy_ms: float  # time at least one copy was running
    compute_ms: float  # time at least one compute kernel was running
    overlap_ms: float  # time both were running
    span_ms: float  # first kernel start to last kernel end

    @property
    def hidden(self) -> float:
        """Fraction of copy time hidden behind compute (1: copies cost nothing; 0: fully exposed)."""
        return self.overlap_ms / self.copy_ms if self.copy_ms else 1.0

    def __str__(self) -> str:
        return (
            f"copies {self.copy_ms:.2f} ms, compute {self.compute_ms:.2f} ms, both at once {self.overlap_ms:.2f} ms "
            f"({self.hidden:.0%} of copy time hidden) over {self.span_ms:.2f} ms"
        )


def overlap(copies: Sequence[Interval], compute: Sequence[Interval]) -> Overlap:
    """Overlap of two sets of (start, end) intervals in ms; intervals within a set may overlap each other."""
    a, b = interval_union(copies), interval_union(compute)
    both, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):  # sweep the two sorted, disjoint lists
        both += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    ends = [e for _, e in a + b]
    starts = [s for s, _ in a + b]
    return Overlap(total_length(a), total_length(b), both, max(ends) - min(starts) if ends else 0.0)


def record_timeline(
    step: Callable[[], object], *, trace_path: str | Path | None = None, steps: int = 3
) -> Overlap:
    """Profile `steps` calls of step() on the GPU (after one skipped and one warm-up) and measure overlap.

    GPU activities named "Memcpy ..." are copies; every other kernel is compute. trace_path: also write the
    Chrome trace, to open in https://ui.perfetto.dev and see the copy stream beside the compute stream.
    """
    prof = profile_steps(step, wait=1, warmup=1, active=steps, trace_path=trace_path, cuda=True)
    copies, compute = [], []
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        span = (e.time_range.start / 1e3, e.time_range.end / 1e3)  # µs -> ms
        (copies if e.name.startswith("Memcpy") else compute).append(span)
    return overlap(copies, compute)


# ----------------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------------

OFFLOAD_VARIANTS = ("none", "offload", "offload+prefetch", "activations")


@dataclass
class OffloadMeasurement:
    """One variant's forward+backward step: median time, throughput and peak device memory."""

    variant: str
    step_ms: float
    tokens_per_s: float
    peak_memory_bytes: int | None  # the most device memory held, the model's included (CUDA only)
    result: BenchResult


def measure_offload(
    config: LlamaConfig,
    batch: int,
    seq_len: int,
    *,
    variants: Sequence[str] = OFFLOAD_VARIANTS,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    **bench_kwargs: Any,
) -> dict[str, OffloadMeasurement]:
    """Time a forward+backward step of a fresh Llama(config) for each variant, with common.bench.

    "none": the plain model on the device. "offload" / "offload+prefetch": apply_parameter_offload without
    and with prefetch. "activations": the plain model under offload_activations. The peak memory is what
    the model holds on the device before the step (its block weights are not there when offloaded) plus
    the step's peak above it, as bench() measures it. bench_kwargs go to common.bench.bench.
    """
    for v in variants:
        if v not in OFFLOAD_VARIANTS:
            raise ValueError(f"variant={v!r} is not one of {', '.join(repr(x) for x in OFFLOAD_VARIANTS)}")
    device = _resolve(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    inputs, targets = random_batch(config, batch, seq_len, seed=seed, device=device)
    results = {}
    for variant in variants:
        torch.manual_seed(seed)
        with device:  # initialised on the device (seconds faster for 1B); offloading copies it to the host
            model = Llama(config).to(dtype=dtype)
        offload = (
            apply_parameter_offload(model, device, prefetch=variant == "offload+prefetch")
            if variant.startswith("offload")
            else None
        )
        model.to(device)
        params = list(offload.parameters()) if offload is not None else list(model.parameters())
        context = offload_activations(model) if variant == "activations" else contextlib.nullcontext()

        def step(
            model: nn.Module = model, params: list[torch.Tensor] = params, context: Any = context
        ) -> None:
            with context:
                model.loss(inputs, targets).backward()
            for p in params:
                p.grad = None

        resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        result = bench(step, name=f"offload {variant}", device=device, **bench_kwargs)
        peak = resident + result.peak_memory_bytes if result.peak_memory_bytes is not None else None
        results[variant] = OffloadMeasurement(
            variant, result.median_ms, batch * seq_len / result.median_ms * 1e3, peak, result
        )
        del model, offload, params, step
    return results
