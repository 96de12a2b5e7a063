"""One training step of a pipeline of any stages, on the 1F1B schedule (PipeDream-Flush), by point-to-point.

p ranks each hold one stage, consecutive pieces of a model: stage s = rank s. A batch is cut into m
micro-batches; stage 0 reads them, the last stage has their targets and computes the loss. Activations travel
forward from stage s to s + 1, their gradients back from s + 1 to s. 1F1B orders each stage's work so that a
micro-batch's backward starts as early as it can: stage s runs w = min(p - s - 1, m) warm-up forwards, then
alternates one forward and one backward, then runs the backwards left:

    stage 0 of 2, m = 4:   F0 | F1 B0 F2 B1 F3 B2 | B3        (at most 2 micro-batches' activations alive)
    stage 1 of 2, m = 4:      | F0 B0 F1 B1 F2 B2 F3 B3 |

GPipe (every forward, then every backward) computes the same gradients but keeps all m micro-batches'
activations alive on stage 0; 1F1B keeps at most min(p - s, m). The grader checks the gradients against the
whole model on one process, the order of your sends and receives against this schedule, and, through the
stage module it gives you, how many micro-batches' saved activations are alive at once on each stage.

The communication of one action, on stage s:

    F i:  s > 0: receive micro-batch i's activation from s - 1;  forward;  s < p - 1: send the output to s + 1
    B i:  s < p - 1: receive the gradient of micro-batch i's output from s + 1;  backward;
          s > 0: send the gradient of micro-batch i's input to s - 1

`common.distributed.pipeline` builds 1F1B for the course's Llama stages; this is the same schedule for any
`nn.Module` stage, written by you with `dist.send` and `dist.recv` (the grader's process group delivers a send
without waiting for its receive, as `isend` would).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn


def one_f_one_b_order(n_stages: int, n_microbatches: int, stage: int) -> list[tuple[str, int]]:
    """Stage `stage`'s actions in 1F1B order: ("F", i) and ("B", i), each micro-batch i once each.

    Raise ValueError unless 0 <= stage < n_stages and n_microbatches >= 1.
    """
    # BEGIN SOLUTION: one_f_one_b_order: warm-up forwards, one forward one backward, the backwards left
    if not 0 <= stage < n_stages or n_microbatches < 1:
        raise ValueError(f"stage {stage} of {n_stages} stages with {n_microbatches} micro-batches")
    m = n_microbatches
    warmup = min(n_stages - stage - 1, m)
    order = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        order += [("F", warmup + i), ("B", i)]
    return order + [("B", i) for i in range(m - warmup, m)]
    # END SOLUTION


def one_f_one_b_step(
    stage: nn.Module,
    n_microbatches: int,
    inputs: list[torch.Tensor] | None,
    targets: list[torch.Tensor] | None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    activation_shape: tuple[int, ...],
    group: dist.ProcessGroup | None = None,
) -> list[float] | None:
    """Forward and backward of one batch of `n_microbatches` (m) micro-batches through the pipeline, called on
    every rank of `group`; stage s is the rank in `group`, p the group's size.

    - inputs: on stage 0, the m micro-batches; None elsewhere. targets: on the last stage, the m targets;
      None elsewhere.
    - Every activation crossing a stage boundary, and its gradient, has shape `activation_shape` and the dtype
      of the stage's parameters: a receive buffer is torch.empty(activation_shape, dtype=...).
    - Gradients accumulate into `stage`'s parameters' .grad as for loss = mean over i of loss_fn(output_i,
      targets[i]): each micro-batch's loss divided by m. Do not zero them or step: the caller does.
    - Returns, on the last stage, the m values loss_fn(output_i, targets[i]) as floats (before dividing by
      m); None on the other stages.
    - Communication: `dist.send` and `dist.recv` on `group`, to the neighbouring stages only, in the order of
      `one_f_one_b_order` and the module docstring. One stage (p = 1): no communication.
    """
    # BEGIN SOLUTION: one_f_one_b_step: walk the 1F1B order; recv, forward, send; recv, backward, send
    p, s = dist.get_world_size(group), dist.get_rank(group)
    m = n_microbatches
    dtype = next(stage.parameters()).dtype
    first, last = s == 0, s == p - 1
    previous = None if first else dist.get_global_rank(group, s - 1) if group is not None else s - 1
    following = None if last else dist.get_global_rank(group, s + 1) if group is not None else s + 1
    stage_inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    losses: list[float] = [0.0] * m
    for kind, i in one_f_one_b_order(p, m, s):
        if kind == "F":
            if first:
                x = inputs[i]
            else:
                x = torch.empty(activation_shape, dtype=dtype)
                dist.recv(x, src=previous, group=group)
                x.requires_grad_(True)
            y = stage(x)
            stage_inputs[i] = x
            if last:
                loss = loss_fn(y, targets[i])
                losses[i] = loss.item()
                outputs[i] = loss / m
            else:
                dist.send(y.detach().contiguous(), dst=following, group=group)
                outputs[i] = y
        else:
            if last:
                outputs.pop(i).backward()
            else:
                grad = torch.empty(activation_shape, dtype=dtype)
                dist.recv(grad, src=following, group=group)
                outputs.pop(i).backward(grad)
            x = stage_inputs.pop(i)  # freed here: 1F1B's point
            if not first:
                dist.send(x.grad.contiguous(), dst=previous, group=group)
    return losses if last else None
    # END SOLUTION
