"""Runs in the submission's worker, on its GPU: the student's offloaded step under a memory budget.

`warm_up` starts CUDA and cuBLAS in the worker, so that the checker's baseline of the GPU's used memory
includes them. `train` caps the worker's caching allocator at the budget, builds the layers on the CPU from
the checker's weights (with gradients already in .grad: the step must add to them), runs the student's step on
"cuda" and returns the output, the bias gradients and two random projections of each weight gradient (the
gradients themselves are larger than a message to the checker may be). The budget that counts is the one the
checker measures from outside; the cap here only makes a submission that exceeds it fail early.
"""

from __future__ import annotations

import torch
from torch import nn


def warm_up() -> int:
    a = torch.ones(64, 64, device="cuda")
    (a @ a).sum().item()  # creates the cuBLAS handle and workspace
    torch.nn.functional.gelu(a).sum().item()
    torch.cuda.synchronize()
    return torch.cuda.device_count()


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


def train(seed: int, shape: list[int], budget_bytes: int, projection_seed: int, device: str = "cuda") -> dict:
    """The student's step on the layers `make(seed, *shape)` describes; what the checker compares."""
    data = make(seed, *shape)
    layers = _layers(data["weights"], data["grads"])
    del data["weights"], data["grads"]
    from largemodels.offload import offloaded_step

    if device == "cuda":
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total))
    out = offloaded_step(layers, data["x"], data["grad"], device)
    generator = torch.Generator().manual_seed(projection_seed)
    seen: dict = {"out": out.detach().clone(), "bias": [], "rows": [], "columns": [], "on_cpu": []}
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
