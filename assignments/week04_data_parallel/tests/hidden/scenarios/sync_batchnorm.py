"""Runs in the submission's worker: the student's SyncBatchNorm on each rank's slice of a batch, via the hub.

Each function returns run_ranks' data: per rank, raw tensors (outputs, gradients, running statistics) and the
collectives the hub saw. The checker computes nn.BatchNorm1d on the concatenated batch itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from common.grading.ranks import run_ranks


def _module(channels: int, weight: torch.Tensor, bias: torch.Tensor, group=None):
    from dataparallel.sync_batchnorm import SyncBatchNorm

    bn = SyncBatchNorm(channels, group=group).to(weight.dtype)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    return bn


def _forward_backward(x: torch.Tensor, grad: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                      groups: list[list[int]] | None) -> dict:  # fmt: skip
    group = None
    for members in groups or []:
        created = dist.new_group(members)  # every rank creates every group
        if dist.get_rank() in members:
            group = created
    bn = _module(x.shape[1], weight, bias, group)
    x = x.clone().requires_grad_(True)
    y = bn(x)
    seen = {
        "y": y.detach().clone(),
        "running_mean": bn.running_mean.clone(),
        "running_var": bn.running_var.clone(),
    }
    if grad is not None:
        y.backward(grad)
        seen.update(dx=x.grad.clone(), dweight=bn.weight.grad.clone(), dbias=bn.bias.grad.clone())
    return seen


def forward_backward(xs: list[torch.Tensor], grads: list[torch.Tensor] | None, weight: torch.Tensor,
                     bias: torch.Tensor, groups: list[list[int]] | None = None) -> dict:  # fmt: skip
    """Rank r normalises xs[r] in training mode and, unless grads is None, backpropagates grads[r]."""
    args = [(x, None if grads is None else grads[r], weight, bias, groups) for r, x in enumerate(xs)]
    return run_ranks(_forward_backward, args, package="dataparallel")


def _train_then_eval(batches: list[torch.Tensor], test: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor) -> dict:  # fmt: skip
    bn = _module(test.shape[1], weight, bias)
    for x in batches:
        bn(x)
    bn.eval()
    return {
        "y": bn(test).detach(),
        "running_mean": bn.running_mean.clone(),
        "running_var": bn.running_var.clone(),
    }


def train_then_eval(batches: list[list[torch.Tensor]], test: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor) -> dict:  # fmt: skip
    """Rank r runs forward on batches[r][0], batches[r][1], ... in training mode, then on `test` in eval mode."""
    return run_ranks(_train_then_eval, [(b, test, weight, bias) for b in batches], package="dataparallel")
