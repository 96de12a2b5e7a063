"""SyncBatchNorm: batch normalisation over the whole global batch, with one collective per pass.

With data parallelism each rank sees only its own slice of the batch, B/W samples. BatchNorm computed per rank
normalises with the statistics of that slice: noisy when B/W is small (detection and segmentation models train
with 1-2 images per GPU), and different from what one GPU with the whole batch would compute. SyncBatchNorm
computes the statistics of the global batch instead, exactly as `nn.BatchNorm1d` would on the concatenation
of every rank's slice, whatever the slices' sizes.

Forward. Each rank sums its slice per channel: sum(x), sum(x**2), and its number of values. One all-reduce of
those three, packed into one tensor, gives the global count n, mean = sum / n and the biased variance
var = sum(x**2) / n - mean**2. Every rank then normalises its own slice: y = (x - mean) / sqrt(var + eps) *
weight + bias.

Backward. With x_hat = (x - mean) / sqrt(var + eps) and dy the gradient of the output, the gradient of the
input involves two global means per channel, mean(dy) and mean(dy * x_hat), over all n values:

    dx = weight / sqrt(var + eps) * (dy - mean(dy) - x_hat * mean(dy * x_hat))

so one all-reduce of [sum(dy), sum(dy * x_hat)] in backward. The gradients of weight and bias are this
rank's own sums, sum(dy * x_hat) and sum(dy): DDP all-reduces them with every other parameter's gradient.

Two collectives where one suffices costs a collective's latency per BatchNorm layer per pass; on a
hundred-layer network at tens of microseconds each, that is milliseconds per step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _channel_shape(x: torch.Tensor) -> list[int]:
    """The shape that broadcasts a per-channel vector over x: [1, C] or [1, C, 1]."""
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch normalisation with the statistics of the global batch; one all-reduce in forward, one in backward."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        eps: float,
        momentum: float,
        group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        """Normalise x (shape (N, C) or (N, C, L)) with the mean and biased variance over every rank's x.

        The ranks of `group` (None: the default group) call it together; their N may differ, and may be 0 on
        some ranks (not on all). Exactly one collective. If running_mean and running_var are given, they are
        updated in place as nn.BatchNorm1d does: running = (1 - momentum) * running + momentum * batch, with
        the *unbiased* variance of the global batch (times n / (n - 1)).
        Returns weight * (x - mean) / sqrt(var + eps) + bias, of x's shape.
        """
        # BEGIN SOLUTION: SyncBatchNormFunction.forward: one all-reduce of per-channel [sum, sum of squares, count], then normalise
        dims = [0, *range(2, x.dim())]
        channels = x.shape[1]
        count = x.new_tensor([x.numel() // channels])
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        dist.all_reduce(stats, group=group)
        total = stats[-1]
        mean = stats[:channels] / total
        var = stats[channels : 2 * channels] / total - mean * mean
        invstd = torch.rsqrt(var + eps)
        shape = _channel_shape(x)
        x_hat = (x - mean.view(shape)) * invstd.view(shape)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
                running_var.mul_(1 - momentum).add_(var * total / (total - 1), alpha=momentum)
        ctx.save_for_backward(x_hat, weight, invstd, total)
        ctx.group = group
        return x_hat * weight.view(shape) + bias.view(shape)
        # END SOLUTION

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Gradients of x (the global-batch formula, one collective), weight and bias (this rank's sums)."""
        # BEGIN SOLUTION: SyncBatchNormFunction.backward: one all-reduce of per-channel [sum(dy), sum(dy * x_hat)], then the input gradient
        x_hat, weight, invstd, total = ctx.saved_tensors
        dims = [0, *range(2, grad_output.dim())]
        channels = grad_output.shape[1]
        shape = _channel_shape(grad_output)
        sum_dy = grad_output.sum(dims)
        sum_dy_x_hat = (grad_output * x_hat).sum(dims)
        sums = torch.cat([sum_dy, sum_dy_x_hat])
        dist.all_reduce(sums, group=ctx.group)
        mean_dy = (sums[:channels] / total).view(shape)
        mean_dy_x_hat = (sums[channels:] / total).view(shape)
        grad_x = (weight * invstd).view(shape) * (grad_output - mean_dy - x_hat * mean_dy_x_hat)
        return grad_x, sum_dy_x_hat, sum_dy, None, None, None, None, None
        # END SOLUTION


class SyncBatchNorm(nn.Module):
    """A drop-in for nn.BatchNorm1d (and nn.SyncBatchNorm) whose training statistics span `group`'s ranks.

    In training mode it calls SyncBatchNormFunction; in eval mode it normalises with the running statistics,
    locally, with no communication.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.eps, self.momentum, self.group = eps, momentum, group
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return nn.functional.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return SyncBatchNormFunction.apply(
            x,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            self.eps,
            self.momentum,
            self.group,
        )
