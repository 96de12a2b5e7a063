"""Triton kernels, each beside its PyTorch reference, its autograd wrapper, its tests and its benchmark.

Each module reads top to bottom as a lesson (see README.md in this folder): softmax, norms (RMSNorm and
LayerNorm), matmul, cross_entropy (fused linear + cross-entropy) and flash_attention; benchmark.py runs
every kernel's benchmark for `effdl bench kernels`.

Without a CUDA GPU, importing this package sets TRITON_INTERPRET=1 (unless the variable is already set),
so the same kernels run in Triton's CPU interpreter on CPU tensors: slow (each program instance runs as
numpy code), but exact enough to learn from and to test on small shapes. Triton reads the variable when
`@triton.jit` decorates a function, which happens when a kernel module is imported, so it is set here,
before any of them (and a triton imported earlier, e.g. by torchvision, is imported again: see
_switch_on_interpreter). `INTERPRETED` tells which mode this process runs in. To run the interpreter on
a GPU machine, start Python with TRITON_INTERPRET=1.

What several kernels share lives here too: the input checks, so a wrong input fails the same clear way
everywhere instead of computing garbage, and the launch heuristics of the row-wise kernels (softmax,
norms), explained in softmax.py.
"""

from __future__ import annotations

import functools
import math
import os
import sys

import torch

from common.errors import MissingDependencyError


def _switch_on_interpreter() -> None:
    """Set TRITON_INTERPRET=1, and make a triton imported earlier import again so that it takes effect.

    Triton decides when it decorates a function whether @triton.jit compiles or interprets it, and its own
    library functions (tl.sum, tl.max, tl.cdiv, ...) are decorated when triton is imported. torchvision
    imports triton as it loads (through torch._library), so in a notebook that imports torchvision first,
    those functions would stay compile-only and fail inside every interpreted kernel. Dropping triton's
    Python modules from sys.modules (not its C extension, which Python cannot load twice) makes the
    `import triton` below decorate them afresh. Modules that imported triton earlier keep their old copy;
    on a machine without a GPU they only use it to ask whether triton is installed.
    """
    os.environ["TRITON_INTERPRET"] = "1"
    for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
        if not name.startswith("triton._C"):
            del sys.modules[name]


if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    _switch_on_interpreter()

try:  # after TRITON_INTERPRET is settled: Triton reads it as it decorates
    import triton
except ModuleNotFoundError as err:  # triton ships for Linux only
    if err.name != "triton":
        raise  # triton is there but something it imports is not: its own error says what
    raise MissingDependencyError(
        "common.kernels needs Triton, which is installed with the course environment on Linux only: "
        "run the kernels on a Linux machine (a GPU one, or any with TRITON_INTERPRET=1 for the interpreter)"
    ) from err

INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Floating-point dtypes the kernels take; each computes in fp32 internally and returns its input dtype.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# "SMs" under the interpreter, each running one program of a persistent kernel: few, so that even the
# small shapes of the CPU tests make each program loop over several blocks (the persistent loop is tested).
INTERPRETER_SMS = 2

__all__ = [
    "FLOAT_DTYPES",
    "INTERPRETED",
    "as_rows",
    "check_input",
    "persistent_grid",
    "programs_per_sm",
    "row_tile",
    "sm_count",
]


def check_input(x: object, name: str, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> torch.Tensor:
    """Raise a clear TypeError/ValueError unless x is a tensor a Triton kernel can take here; return it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(
            f"{name} has dtype {x.dtype}; this kernel supports {', '.join(str(d) for d in dtypes)}: "
            f"convert it first, e.g. {name}.to(torch.float32)"
        )
    if x.device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"{name} is on {x.device}, but compiled Triton kernels run on a CUDA GPU: move it with "
            f"{name}.cuda(), or set TRITON_INTERPRET=1 before importing common.kernels to run the interpreter"
        )
    if INTERPRETED and x.dtype == torch.bfloat16:
        raise TypeError(
            f"{name} is bfloat16, which Triton's CPU interpreter rounds differently from a GPU (results "
            "off by one bf16 ulp): use float32 or float16 under the interpreter, bfloat16 on a GPU"
        )
    return x


@functools.cache  # asked on every launch of a persistent kernel; device properties don't change
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device`, which size a persistent grid (INTERPRETER_SMS on a CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS


def as_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """x as a 2D (rows, last dim) view with unit column stride, or a clear error; never a hidden copy."""
    check_input(x, name)
    if x.dim() == 0:
        raise ValueError(f"{name} is a scalar; this kernel works on rows along the last dim")
    if x.numel() > 0 and x.stride(-1) != 1:
        raise ValueError(
            f"{name} has stride {x.stride(-1)} along its last dim; the kernel reads rows contiguously: "
            f"pass {name}.contiguous()"
        )
    try:
        return x.view(math.prod(x.shape[:-1]), x.shape[-1])  # explicit row count: -1 is ambiguous if N = 0
    except RuntimeError as err:
        raise ValueError(
            f"{name} with shape {tuple(x.shape)} and strides {x.stride()} cannot be viewed as rows without "
            f"a copy: pass {name}.contiguous()"
        ) from err


# Launch heuristics of the row-wise kernels (softmax, norms); softmax.py, section 5, tells the reasoning.
# Elements per tile when rows are short: rows are packed until a tile holds this many.
TILE_ELEMENTS = 4096
# fp32 values of one tile-sized array that each thread should hold at most: ~32 leaves room in the 255
# registers a thread can have, and a 4-warp program of a 4096-element tile holds exactly that.
VALUES_PER_THREAD = 32
# Pipelining prefetches the next tile into shared memory; only worth it (and only fits) for small tiles.
MAX_PIPELINED_TILE_BYTES = 32 * 1024


def row_tile(
    n_cols: int, bytes_per_col: int, live_rows: int = 1, tile_elements: int = TILE_ELEMENTS
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a tile of whole rows of n_cols elements.

    bytes_per_col: bytes loaded per element position (e.g. 2 inputs of bf16: 4), to size the pipeline.
    live_rows: how many tile-sized fp32 arrays the kernel keeps in registers at once (softmax forward: 1;
    a backward holding y and dy: 2), so that bigger working sets get more threads instead of spilling.
    tile_elements: rows are packed until a tile holds this many elements.
    """
    block_n = triton.next_power_of_2(n_cols)
    block_m = max(1, tile_elements // block_n)
    threads = block_m * block_n * live_rows // VALUES_PER_THREAD
    num_warps = min(32, max(4, triton.next_power_of_2(threads) // 32))
    num_stages = 2 if block_m * block_n * bytes_per_col <= MAX_PIPELINED_TILE_BYTES else 1
    return block_m, block_n, num_warps, num_stages


_PROGRAMS_PER_SM: dict[tuple, int] = {}


def programs_per_sm(kernel: triton.JITFunction, args: tuple, meta: dict) -> int:
    """How many programs of kernel(*args, **meta) an SM holds at once: the tightest of its registers,
    shared memory and threads, read from the compiled kernel (compiled here on first use, then cached).
    """
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    if device.type != "cuda" or INTERPRETED:
        return 1
    key = (
        id(kernel),
        device,
        tuple(a.dtype for a in args if isinstance(a, torch.Tensor)),
        tuple(sorted(meta.items())),
    )
    if key not in _PROGRAMS_PER_SM:
        compiled = kernel.warmup(*args, grid=(1,), **meta)
        compiled._init_handles()  # loads the binary: fills in n_regs
        props = torch.cuda.get_device_properties(device)
        threads = 32 * meta["num_warps"]
        fits = [
            props.regs_per_multiprocessor // (compiled.n_regs * threads),
            props.max_threads_per_multi_processor // threads,
        ]
        if compiled.metadata.shared:
            fits.append(props.shared_memory_per_multiprocessor // compiled.metadata.shared)
        _PROGRAMS_PER_SM[key] = max(1, min(fits))
    return _PROGRAMS_PER_SM[key]


def persistent_grid(
    kernel: triton.JITFunction, n_items: int, args: tuple, meta: dict, waves: int | None = 1
) -> tuple[int]:
    """Grid of a launch of kernel(*args, **meta) over n_items blocks of work.

    waves=1: persistent, exactly as many programs as fit on the GPU at once (programs_per_sm x SMs),
    never more than there are items, each looping over the blocks pid, pid + programs, ... A partial
    extra wave would make the slowest SM take up to twice as long, but whole extra waves (waves=2) keep
    more loads in flight per SM while one wave reduces, which pays on memory-bound kernels on an H200.
    waves=None: one program per block, scheduled by the hardware. Under the interpreter:
    INTERPRETER_SMS programs per wave.
    """
    if waves is None:
        return (max(1, n_items),)
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    return (max(1, min(n_items, waves * sm_count(device) * programs_per_sm(kernel, args, meta))),)
