"""Hidden test of `largemodels.offload` (task offload, 1 GPU).

A stack of 8 Linear(4096, 4096) + GELU layers: 512 MiB of float32 parameters and as much again of gradients,
against a budget of 384 MiB of GPU memory. The budget is the most the worker's caching allocator held at once
on the task's GPU during the step (`max_memory_reserved` of that device, its peak reset after the warm-up and
the cache emptied: the process's own memory, not another process's and not the warm-up's), read by the
scenario in the worker (see `scenarios/offload.py` for what that can and cannot see). Keeping every layer's
parameters on the GPU needs 512 MiB for them alone. The same figures show that the step ran on that GPU: the
forward alone must bring every layer's weight there, so the allocator handed out at least the 512 MiB of
weights over the step; a step that ignores `device` and computes on the CPU hands out nothing.

Reference: the same layers in float64 on the CPU, here, with the same gradients already in .grad.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scenarios import offload

from common.grading.client import Submission

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

WIDTH, DEPTH, BATCH = 4096, 8, 64
MIB = 2**20
BUDGET = 384 * MIB  # one or two layers' weights and gradients (128 MiB each) + cuBLAS workspace + activations
SEED = 7  # of the random vectors the weight gradients are projected on
# float32 on the GPU against float64: each matmul sums 4096 products, relative error ~sqrt(4096) * 2^-24
# ~ 4e-6, compounded over 8 layers and 3 matmuls per layer: well under 1e-3 of the values' scale.
RTOL = 1e-3


def reference(data: dict) -> dict:
    """The whole stack on the CPU in float64: output, bias gradients, projections of the weight gradients."""
    h = data["x"].double()
    params = [[t.double().requires_grad_(True) for t in layer] for layer in data["weights"]]
    for weight, bias in params:
        h = F.gelu(h @ weight.T + bias)
    h.backward(data["grad"].double())
    generator = torch.Generator().manual_seed(SEED)
    seen: dict = {"out": h.detach(), "bias": [], "rows": [], "columns": []}
    for (weight, bias), (weight_grad, bias_grad) in zip(params, data["grads"], strict=True):
        g = weight.grad + weight_grad.double()
        u = torch.randn(g.shape[0], generator=generator, dtype=torch.float64)
        v = torch.randn(g.shape[1], generator=generator, dtype=torch.float64)
        seen["bias"].append(bias.grad + bias_grad.double())
        seen["rows"].append(g @ v)
        seen["columns"].append(u @ g)
    return seen


def check_memory(memory: dict[str, int] | None, budget: int, weight_bytes: int) -> None:
    """The step's memory on the task's GPU (`scenarios.offload.step_memory`) within `budget`, and at least the
    model's weights (`weight_bytes`) handed out on the device: the work ran there."""
    assert type(memory) is dict and all(type(memory.get(k)) is int for k in ("peak_reserved", "allocated")), (
        f"the step's GPU memory could not be read: {memory!r}"
    )
    assert memory["peak_reserved"] <= budget, (
        f"the step held {memory['peak_reserved'] / MIB:.0f} MiB of the task's GPU at its peak; the budget is "
        f"{budget / MIB:.0f} MiB"
    )
    assert memory["allocated"] >= weight_bytes, (
        f"the step allocated {memory['allocated'] / MIB:.0f} MiB on the task's GPU in all, less than the "
        f"{weight_bytes / MIB:.0f} MiB of weights its forward must bring there: compute on `device`"
    )


def close(ours: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert type(ours) is torch.Tensor and ours.shape == expected.shape, (
        f"{what}: expected a tensor of shape {list(expected.shape)}, got {list(getattr(ours, 'shape', []))}"
    )
    scale = expected.abs().max().item()
    torch.testing.assert_close(ours.double(), expected, rtol=RTOL, atol=RTOL * scale, msg=what)


def test_offloaded_step_equals_the_whole_model_and_stays_under_the_budget(submission: Submission) -> None:
    ref = reference(offload.make(0, WIDTH, DEPTH, BATCH))
    submission.run(offload.warm_up, returns=int)
    seen = submission.run(offload.train, 0, [WIDTH, DEPTH, BATCH], BUDGET, SEED, returns=dict)
    check_memory(seen["memory"], BUDGET, DEPTH * WIDTH * WIDTH * 4)
    assert seen["out_device"] == "cpu", f"the output must be returned on the CPU, not on {seen['out_device']}"
    assert seen["on_cpu"] == [True] * DEPTH, "the layers' parameters must end on the CPU"
    close(seen["out"], ref["out"], "the output")
    for i in range(DEPTH):
        close(seen["bias"][i], ref["bias"][i], f"layer {i}'s bias gradient (added to the one it had)")
        close(seen["rows"][i], ref["rows"][i], f"layer {i}'s weight gradient (times a random vector)")
        close(
            seen["columns"][i], ref["columns"][i], f"layer {i}'s weight gradient (a random vector times it)"
        )
