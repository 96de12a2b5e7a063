"""A launch cache: call a compiled Triton kernel again without paying Triton's Python launch path.

What you will learn: where the host time of a kernel launch goes, and how to skip what does not change.

`kernel[grid](*args)` does a lot of Python on every call: the autotuner builds its key and runs the
winner's pre-hook, then `JITFunction.run` binds the arguments, *specialises* each one (dtype, is an int 1
or a multiple of 16, is a pointer 16-byte aligned) to find the compiled binary, and computes the grid. For
a 1024³ matmul that cost ~150 µs of host time per call on an H200, against ~11 µs of GPU time, so the
GPU idled most of the time. (torch.matmul costs ~20 µs of host time.)

For a fixed problem, none of that changes between calls except the tensors' addresses. So `LaunchCache`
runs the normal path once per *key*, remembers the compiled kernel, the launch grid and the constexpr
arguments the autotuner chose, and from then on calls the compiled kernel's C launcher directly.

Even the compiled kernel's own `run` costs more than it needs to. Its Python wrapper asks the allocator for
global scratch on every call, and the C launcher asks the driver about every tensor argument
(`cuPointerGetAttribute`, to refuse a CPU tensor with a clear error) but takes a plain integer address
as it is. In a probe on an H100's host, a 1024³ matmul's launch through `run` took 19 µs, against 8 µs
through the C launcher with integer addresses. The cache therefore passes `data_ptr()` integers to the C
launcher itself; the key has each tensor's device, so a CPU tensor never reaches that path. With it,
`effdl bench kernels --kernel matmul` measured 18 µs of host time per 1024³ call on an H100 (torch.matmul:
11 µs); through the compiled kernel's `run`, a probe on an H100's host had measured 35.6 µs.

The caller's key must capture everything Triton specialises on, or a binary compiled for other inputs
would run: every integer argument's value (shapes, strides), every tensor's dtype, device and whether its
address is 16-byte aligned, and the constexpr arguments. `tensor_key` gives the tensor part.

The fast path is off under the interpreter (nothing is compiled there) and while a tool has hooked
Triton's launches (a profiler such as proton does; its hooks need the slow path's launch metadata).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton
from triton import knobs
from triton.runtime import driver
from triton.runtime._allocation import _allocator as triton_allocator
from triton.runtime.autotuner import Autotuner

from common.kernels import INTERPRETED, persistent_grid

Grid = Callable[[dict[str, Any]], tuple[int, ...]]


def tensor_key(*tensors: torch.Tensor) -> tuple:
    """What Triton specialises a tensor argument on, plus its geometry and device: shape, strides, dtype,
    alignment, device index (-1 on the CPU)."""
    return tuple((t.shape, t.stride(), t.dtype, t.data_ptr() % 16 == 0, t.get_device()) for t in tensors)


def arguments_key(args: Sequence[Any], constexprs: dict[str, Any]) -> tuple:
    """A key for launching with these arguments: tensors by tensor_key, everything else by value."""
    return (
        *(tensor_key(a)[0] if isinstance(a, torch.Tensor) else a for a in args),
        *constexprs.items(),
    )


def launch_hooks_installed() -> bool:
    """Whether a tool (a profiler such as proton) has hooked Triton's launches; they need the slow path."""
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    # Triton 3.6 keeps an empty HookChain there by default; older releases keep None.
    return any(bool(getattr(hook, "calls", hook)) for hook in hooks)


@dataclass
class _Entry:
    kernel: Any  # triton's CompiledKernel
    launcher: Any  # its C launcher (behind a wrapper that encodes host-side TMA descriptors, if any)
    grid: tuple[int, int, int]
    constexpr_tail: tuple[Any, ...]  # the arguments after the positional ones: all constexpr
    tensor_positions: tuple[int, ...]  # which positional arguments are tensors: passed as addresses
    scratch: tuple[int, int]  # (bytes, alignment) of global scratch the kernel needs; (0, 0) if none
    pre_hook: Callable[[dict[str, Any]], None] | None  # the chosen config's pre-hook (TMA block shapes)
    hook_args: dict[str, Any]  # the config's constexprs, for the pre-hook
    arg_names: tuple[str, ...]


class LaunchCache:
    """Per-key compiled launches of one (possibly autotuned) Triton kernel.

    cache = LaunchCache(kernel)
    cache.launch(key, grid, a, b, M, N, ACTIVATION="none")   # first call per key: Triton's normal path
    cache.launch(key, grid, a2, b2, M, N, ACTIVATION="none") # later calls: the compiled launcher only

    Positional arguments are the kernel's runtime arguments, in its signature order; keyword arguments
    must all be constexprs. grid(meta) gets the constexprs (the autotuner's choice included). key=None
    launches through Triton's normal path and remembers nothing.
    """

    def __init__(self, kernel: triton.JITFunction | Autotuner) -> None:
        self.kernel = kernel
        self.jit = kernel.fn if isinstance(kernel, Autotuner) else kernel
        self.entries: dict[Any, _Entry] = {}

    def launch(self, key: Any, grid: Grid | Sequence[int], *args: Any, **constexprs: Any) -> None:
        if key is None or INTERPRETED:
            self.kernel[grid](*args, **constexprs)
            return
        device = driver.active.get_current_device()  # Triton launches on the current device, as here
        entry = self.entries.get((key, device))
        if entry is None or launch_hooks_installed():
            self._slow_launch((key, device), grid, args, constexprs)
            return
        if entry.pre_hook is not None:
            entry.pre_hook({**dict(zip(entry.arg_names, args, strict=True)), **entry.hook_args})
        kernel = entry.kernel
        stream = driver.active.get_current_stream(device)
        # Global scratch from the allocator set with triton.set_allocator, as Triton's run asks it; the
        # buffer is held until the kernel is queued, so that no allocation in between can be handed it.
        scratch = triton_allocator.get()(*entry.scratch, stream) if entry.scratch[0] else None
        args = list(args)
        for i in entry.tensor_positions:
            args[i] = args[i].data_ptr()
        # What the compiled kernel's run ends with: no launch metadata or hooks (none are installed), no
        # profiler scratch (_slow_launch keeps no entry for a kernel that needs it).
        launcher = entry.launcher
        launcher.launch(*entry.grid, stream, kernel.function, launcher.launch_cooperative_grid,
                        launcher.launch_pdl, None if scratch is None else scratch.data_ptr(), None,
                        kernel.packed_metadata, None, None, None,
                        *args, *entry.constexpr_tail)  # fmt: skip

    def launch_auto(self, grid: Grid | Sequence[int], *args: Any, **constexprs: Any) -> None:
        """launch() with the key made from the arguments themselves (arguments_key): for kernels whose
        grid and compiled binary follow from their arguments alone."""
        self.launch(arguments_key(args, constexprs), grid, *args, **constexprs)

    def launch_persistent(self, n_items: int, *args: Any, waves: int | None = 1, **constexprs: Any) -> None:
        """Launch on common.kernels.persistent_grid over n_items blocks (sized from the compiled kernel's
        occupancy once per key); the key is made from the arguments themselves, as in launch_auto."""
        self.launch(
            (waves, *arguments_key(args, constexprs)),
            lambda _: persistent_grid(self.kernel, n_items, args, constexprs, waves),
            *args,
            **constexprs,
        )

    def _slow_launch(
        self, key: Any, grid: Grid | Sequence[int], args: Sequence[Any], constexprs: dict
    ) -> None:
        compiled = self.kernel[grid](*args, **constexprs)
        if key in self.entries:
            return
        config = self.kernel.best_config if isinstance(self.kernel, Autotuner) else None
        chosen = {**constexprs, **(config.kwargs if config is not None else {})}
        params = self.jit.params
        tail = []
        for param in params[len(args) :]:
            if not param.is_constexpr:
                raise TypeError(
                    f"{self.jit.__name__}: argument {param.name!r} is not a constexpr; LaunchCache takes "
                    "runtime arguments positionally"
                )
            if param.name in chosen:
                tail.append(chosen[param.name])
            elif param.has_default:
                tail.append(param.default)
            else:
                raise TypeError(f"{self.jit.__name__}: constexpr {param.name!r} was not given")
        size = tuple(grid(chosen)) if callable(grid) else tuple(grid)
        size = (*size, *(1,) * (3 - len(size)))
        launcher = compiled.run  # loads the binary now, so the fast path never does
        if launcher.profile_scratch_size:  # instrumented by a profiler: keep Triton's own path
            return
        scratch = (0, 0)
        if launcher.global_scratch_size:
            nbytes = math.prod(size) * launcher.num_ctas * launcher.global_scratch_size
            scratch = (nbytes, launcher.global_scratch_align)
        self.entries[key] = _Entry(
            kernel=compiled,
            launcher=launcher,
            grid=size,
            constexpr_tail=tuple(tail),
            tensor_positions=tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor)),
            scratch=scratch,
            pre_hook=config.pre_hook if config is not None else None,
            hook_args=dict(chosen),
            arg_names=tuple(p.name for p in params[: len(args)]),
        )
