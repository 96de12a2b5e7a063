"""Runs in the submission's worker on the task's GPU: the student's W8A8 GEMM on large operands, repeated.

`prepare` builds the operands from a seed (the checker builds the same ones with `operands`) and runs the
GEMM once, which autotunes and compiles it; `repeat(reps)` runs it reps times and synchronizes, for the
checker to time the whole call from its side; `rows` returns rows of the last output for the checker to
check. Nothing here measures time or judges.
"""

from __future__ import annotations

import torch

from common.grading.off_limits import refuse_imports

# As in int8_kernels (a scenario reaches the worker as its own source, so it cannot import a sibling).
OFF_LIMITS = ("common.inference.quantization",)
REASON = "write the quantization and the GEMM as Triton kernels"

_STATE: dict[str, object] = {}  # the operands and the last output, kept between the checker's calls


def operands(m: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, ...]:
    """int8 codes and float32 scales of an (m, k) x (n, k) GEMM, made on the CPU (the same on every GPU)."""
    generator = torch.Generator().manual_seed(seed)
    x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=generator)
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
    x_scale = torch.rand(m, generator=generator) * 0.01 + 1e-4
    w_scale = torch.rand(n, generator=generator) * 1e-3 + 1e-5
    return x_q, x_scale, w_q, w_scale


def prepare(m: int, n: int, k: int, seed: int) -> None:
    refuse_imports(OFF_LIMITS, REASON)  # the rule, stated here as in the correctness tasks
    from fastinfer.w8a8 import w8a8_matmul

    _STATE["args"] = tuple(t.cuda() for t in operands(m, n, k, seed))
    _STATE["gemm"] = w8a8_matmul
    repeat(1)  # the first call autotunes: every config compiled and timed


def repeat(reps: int) -> None:
    gemm, args = _STATE["gemm"], _STATE["args"]
    for _ in range(reps):
        _STATE["y"] = gemm(*args, out_dtype=torch.bfloat16)
    torch.cuda.synchronize()


def rows(step: int) -> torch.Tensor:
    """Every step-th row of the last output, on the CPU."""
    return _STATE["y"][::step].cpu()
