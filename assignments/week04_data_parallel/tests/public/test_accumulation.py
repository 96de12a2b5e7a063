"""Public test of `dataparallel.accumulation`: the same steps as one process on the whole global batch.

The hidden tests also count your collectives: none on the micro-batches that do not step, one on those that do.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from conftest import on_ranks
from dataparallel.accumulation import GradientAccumulator
from torch import nn

WORLD, MICRO, STEPS, ROWS = 2, 3, 2, 4  # ranks, micro-batches per step, optimizer steps, rows per micro-batch


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def batches() -> tuple[torch.Tensor, torch.Tensor]:
    """x, y of shape (STEPS, WORLD, MICRO, ROWS, ...)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, WORLD, MICRO, ROWS, 5, generator=generator, dtype=torch.float64)
    return x, x.sum(-1, keepdim=True).sin()


def rank_train() -> list[torch.Tensor]:
    rank, net = dist.get_rank(), model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    accumulator = GradientAccumulator(net, optimizer, MICRO)
    x, y = batches()
    stepped = []
    for step in range(STEPS):
        for micro in range(MICRO):
            loss = nn.functional.mse_loss(net(x[step, rank, micro]), y[step, rank, micro])
            stepped.append(accumulator.backward(loss))
    assert stepped == [m == MICRO - 1 for _ in range(STEPS) for m in range(MICRO)], stepped
    return [p.detach() for p in net.parameters()]


def test_equals_one_process_on_the_global_batch() -> None:
    results = on_ranks(rank_train, WORLD)
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = batches()
    for step in range(STEPS):
        optimizer.zero_grad()
        nn.functional.mse_loss(net(x[step].reshape(-1, 5)), y[step].reshape(-1, 1)).backward()
        optimizer.step()
    for rank in range(WORLD):
        for ours, reference in zip(results[rank], net.parameters(), strict=True):
            torch.testing.assert_close(ours, reference.detach())
