"""Runs in the submission's worker, on its GPU: the student's offloaded step under a memory budget.

The task's GPU is the worker's current CUDA device (the sandbox shows the worker only the GPUs the task was
given), never a fixed index. `warm_up` starts CUDA and cuBLAS there. `train` builds the layers on the CPU from
the checker's weights (with gradients already in .grad: the step must add to them), empties the allocator's
cache, caps it at the budget, resets its peak statistics and runs the student's step on that device. It
returns the output and where it lives, the bias gradients, two random projections of each weight gradient
(the gradients themselves are larger than a message to the checker may be) and the step's memory on the
device as the caching allocator counted it: the most it held at once (`max_memory_reserved`: what the process
took from the GPU, allocated or cached) and the bytes it handed out over the step (the weights that came to the
device among them: a step that never used the GPU hands out none).

These figures are read in the worker, beside the student's code, which could reset the statistics, lift the
cap or allocate around the allocator: deliberate work, plain in the submitted source. Unlike a probe of the
whole GPU's free memory they count neither another process's memory nor the warm-up's cache.
"""

from __future__ import annotations

import torch
from torch import nn


def task_device() -> torch.device:
    """The GPU this task was given: the worker's current CUDA device."""
    return torch.device("cuda", torch.cuda.current_device())


def warm_up() -> int:
    device = task_device()
    a = torch.ones(64, 64, device=device)
    (a @ a).sum().item()  # creates the cuBLAS handle and workspace
    torch.nn.functional.gelu(a).sum().item()
    torch.cuda.synchronize(device)
    return torch.cuda.device_count()


def step_memory(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The step's memory from `torch.cuda.memory_stats` taken after the peak was reset and after the step: the
    most the allocator held at once, and the bytes it handed out in between (a cumulative count)."""
    return {
        "peak_reserved": after["reserved_bytes.all.peak"],
        "allocated": after["allocated_bytes.all.allocated"] - before["allocated_bytes.all.allocated"],
    }


def make(seed: int, width: int, depth: int, batch: int) -> dict:
    """The weights, the gradients already in .grad, the input and the output's gradient, from `seed` (the
    checker calls this too: the weights are larger than a message between the two may be)."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * scale

    weights = [[draw(width, width, scale=width**-0.5), draw(width, scale=0.1)] for _ in range(depth)]
    # as large as the step's own gradients, so that dropping them (not adding to .grad) is caught
    grads = [[draw(width, width), draw(width)] for _ in range(depth)]
    return {"weights": weights, "grads": grads, "x": draw(batch, width), "grad": draw(batch, width)}


def _layers(weights: list[list[torch.Tensor]], grads: list[list[torch.Tensor]]) -> list[nn.Module]:
    layers = []
    for (weight, bias), (weight_grad, bias_grad) in zip(weights, grads, strict=True):
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        linear.weight.grad, linear.bias.grad = weight_grad, bias_grad
        layers.append(nn.Sequential(linear, nn.GELU()))
    return layers


def train(seed: int, shape: list[int], budget_bytes: int, projection_seed: int, on_gpu: bool = True) -> dict:
    """The student's step on the layers `make(seed, *shape)` describes, on the task's GPU (or on the CPU, for
    the repository's test of this checker); what the checker compares."""
    data = make(seed, *shape)
    layers = _layers(data["weights"], data["grads"])
    del data["weights"], data["grads"]
    from largemodels.offload import offloaded_step

    device = task_device() if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.empty_cache()  # the warm-up's cached blocks are not the step's
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_stats(device)
    out = offloaded_step(layers, data["x"], data["grad"], device)
    memory = step_memory(before, torch.cuda.memory_stats(device)) if on_gpu else None
    generator = torch.Generator().manual_seed(projection_seed)
    seen: dict = {"out": out.detach().clone(), "out_device": str(out.device), "memory": memory, "bias": [],
                  "rows": [], "columns": [], "on_cpu": []}  # fmt: skip
    for layer in layers:
        linear = layer[0]
        g = linear.weight.grad.double()
        u = torch.randn(g.shape[0], generator=generator, dtype=torch.float64)
        v = torch.randn(g.shape[1], generator=generator, dtype=torch.float64)
        seen["bias"].append(linear.bias.grad.clone())
        seen["rows"].append(g @ v)
        seen["columns"].append(u @ g)
        seen["on_cpu"].append(all(p.device.type == "cpu" for p in linear.parameters()))
    return seen
