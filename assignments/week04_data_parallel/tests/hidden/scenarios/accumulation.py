"""Runs in the submission's worker: training with the student's GradientAccumulator on every rank, via the hub.

The model and data are built here from seeds, so the checker builds the same ones for its single-process
reference. Each rank returns, per micro-batch, what backward() returned, and its parameters after every step.
"""

from __future__ import annotations

import torch
from torch import nn

from common.grading.ranks import run_ranks

FEATURES = 6


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 7), nn.Tanh(), nn.Linear(7, 2)).double()


def batches(
    steps: int, world_size: int, micro: int, rows: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y of shape (steps, world_size, micro, rows, ...)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, world_size, micro, rows, FEATURES, generator=generator, dtype=torch.float64)
    return x, torch.stack([x.sum(-1).sin(), x[..., 0] * x[..., 1]], dim=-1)


def optimizer(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)


def _train(micro: int, x: torch.Tensor, y: torch.Tensor, calls: int) -> dict:
    """`calls` micro-batches of this rank (x, y of shape (steps, micro, rows, ...)), in order."""
    from dataparallel.accumulation import GradientAccumulator

    net = model()
    accumulator = GradientAccumulator(net, optimizer(net), micro)
    stepped, params = [], []
    flat_x, flat_y = x.flatten(0, 1), y.flatten(0, 1)
    for call in range(calls):
        loss = nn.functional.mse_loss(net(flat_x[call]), flat_y[call])
        stepped.append(accumulator.backward(loss))
        if stepped[-1]:
            params.append([p.detach().clone() for p in net.parameters()])
    return {"stepped": stepped, "params": params, "final": [p.detach().clone() for p in net.parameters()]}


def train(steps: int, world_size: int, micro: int, rows: int, seed: int, calls: int | None = None) -> dict:
    """Every rank trains on its micro-batches of `batches(...)`; `calls` of them (default: all)."""
    x, y = batches(steps, world_size, micro, rows, seed)
    calls = steps * micro if calls is None else calls
    args = [(micro, x[:, rank], y[:, rank], calls) for rank in range(world_size)]
    return run_ranks(_train, args, package="dataparallel")
