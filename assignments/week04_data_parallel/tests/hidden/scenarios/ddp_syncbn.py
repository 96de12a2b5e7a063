"""A DDP training step with SyncBatchNorm on 2 GPUs (NCCL): the student's module in the worker's ranks, torch's
nn.SyncBatchNorm in the checker's. The same function runs on both sides; `ours` says which module to use.

Each rank trains a small MLP wrapped in torch's DistributedDataParallel on its own (uneven) slice of each batch
and returns raw observations: the losses, the parameters and the BatchNorm buffers after the steps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from common.grading.ranks import run_ranks

FEATURES, HIDDEN, CLASSES, STEPS = 12, 32, 5, 3
SIZES = [6, 10]  # rows per rank: uneven


def batches() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = 1 + 2 * torch.randn(STEPS, sum(SIZES), FEATURES, generator=generator)
    return x, torch.randint(CLASSES, (STEPS, sum(SIZES)), generator=generator)


def _norm(ours: bool) -> nn.Module:
    if ours:
        from dataparallel.sync_batchnorm import SyncBatchNorm

        return SyncBatchNorm(HIDDEN)
    return nn.SyncBatchNorm(HIDDEN)


def train_rank(ours: bool) -> dict:
    """Rank r: STEPS steps of DDP + SyncBatchNorm on rows SIZES[r] of each batch; observations on the CPU."""
    rank = dist.get_rank()
    device = torch.device("cuda", rank)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, HIDDEN), _norm(ours), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))
    model = nn.parallel.DistributedDataParallel(model.to(device), device_ids=[rank])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = batches()
    losses = []
    for step in range(STEPS):
        rows = slice(sum(SIZES[:rank]), sum(SIZES[: rank + 1]))
        loss = nn.functional.cross_entropy(model(x[step, rows].to(device)), y[step, rows].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    state = {name: t.detach().cpu() for name, t in model.module.state_dict().items()}
    return {"losses": losses, "state": state}


def train_with_student_syncbn() -> dict:
    """`train_rank(ours=True)` on 2 GPU ranks over NCCL (spawned: the worker has initialised CUDA)."""
    return run_ranks(train_rank, [(True,), (True,)], package="dataparallel", backend="nccl", timeout_s=300)
