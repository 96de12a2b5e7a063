"""Gradient accumulation under data parallelism: communicate once per optimizer step, not per micro-batch.

A global batch that does not fit is split into K micro-batches per rank. Each micro-batch's backward adds into
.grad; only after the K-th does the optimizer step. The all-reduce that averages gradients over the ranks is
needed once per step: the average of the sums is the sum of the averages. Doing it after every micro-batch
gives the same numbers and pays K times the communication (torch's DDP has `no_sync()` for this; here you
write the whole thing).

Scaling. With loss_i the mean loss of micro-batch i, backpropagating loss_i / K on every micro-batch leaves
sum_i grad(loss_i) / K in .grad: the gradient of the mean loss over the rank's K micro-batches. Averaging that
over W ranks gives the gradient of the mean loss over the global batch of K * W micro-batches (of equal size):
the step a single process would take on the whole batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class GradientAccumulator:
    """Accumulates `accumulation_steps` micro-batches per rank, then averages gradients over the ranks and steps.

    Every rank constructs one, with a replica of the same model (equal parameters on every rank) and its
    optimizer. Every parameter that requires grad must get a gradient in every backward.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        accumulation_steps: int,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.accumulation_steps, self.group = optimizer, accumulation_steps, group
        self.micro_step = 0  # micro-batches backpropagated since the run began

    def backward(self, loss: torch.Tensor) -> bool:
        """Backpropagate one micro-batch's mean loss; on every accumulation_steps-th call, also sync and step.

        On the micro-batches that do not step: backward of loss / accumulation_steps, and no communication at
        all. On the one that does: the same backward, then exactly one collective, an all-reduce of every
        parameter's gradient packed into one flat buffer, divided by the world size (gloo has no average);
        then optimizer.step() and optimizer.zero_grad().

        Returns:
            True if the optimizer stepped.
        """
        # BEGIN SOLUTION: GradientAccumulator.backward: backward of loss / K; every K-th call one flat all-reduce of the grads, average, step, zero_grad
        (loss / self.accumulation_steps).backward()
        self.micro_step += 1
        if self.micro_step % self.accumulation_steps:
            return False
        grads = [p.grad for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.group)
        flat.div_(dist.get_world_size(self.group))
        for grad, averaged in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(averaged.view_as(grad))
        self.optimizer.step()
        self.optimizer.zero_grad()
        return True
        # END SOLUTION
