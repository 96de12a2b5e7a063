"""Public tests of `dataparallel.sync_batchnorm`: equal to nn.BatchNorm1d on the concatenated batch.

The hidden tests check more shapes, world sizes and a rank with no samples, and count your collectives: exactly
one in forward and one in backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from conftest import on_ranks
from dataparallel.sync_batchnorm import SyncBatchNorm
from torch import nn

SIZES = [5, 2, 9]  # rows per rank: uneven on purpose
CHANNELS = 4


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = 3 + 2 * torch.randn(sum(SIZES), CHANNELS, 6, generator=generator, dtype=torch.float64)
    return x, torch.randn(x.shape, generator=generator, dtype=torch.float64)


def rank_step() -> dict[str, torch.Tensor]:
    rank = dist.get_rank()
    x, grad = (t.split(SIZES)[rank].clone() for t in data())
    bn = SyncBatchNorm(CHANNELS).double()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, CHANNELS))
    x.requires_grad_(True)
    y = bn(x)
    y.backward(grad)
    return {"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
            "mean": bn.running_mean, "var": bn.running_var}  # fmt: skip


def test_equals_batchnorm1d_on_the_whole_batch() -> None:
    results = on_ranks(rank_step, len(SIZES))
    x, grad = data()
    x.requires_grad_(True)
    bn = nn.BatchNorm1d(CHANNELS).double()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, CHANNELS))
    y = bn(x)
    y.backward(grad)
    ours = [results[rank] for rank in range(len(SIZES))]
    torch.testing.assert_close(torch.cat([r["y"] for r in ours]), y.detach())
    torch.testing.assert_close(torch.cat([r["dx"] for r in ours]), x.grad)
    torch.testing.assert_close(sum(r["dw"] for r in ours), bn.weight.grad)  # DDP adds the ranks' shares
    torch.testing.assert_close(sum(r["db"] for r in ours), bn.bias.grad)
    for r in ours:
        torch.testing.assert_close(r["mean"], bn.running_mean)
        torch.testing.assert_close(r["var"], bn.running_var)
