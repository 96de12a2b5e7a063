"""Runs in the submission's worker: the student's 1F1B step on each stage, through the grader's hub.

Rank s builds its stage (linear layers, each followed by tanh) from the weights the checker sent it, and runs
several training steps: zero the gradients, the scenario's barrier (the checker's marker between steps), the
student's `one_f_one_b_step`, an SGD step. It returns each step's losses (last stage) and parameters after each
step; the hub's log holds every send and receive. The checker trains the whole model on one process itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from common.grading.ranks import run_ranks

PACKAGE = "largemodels"


def _stage(weights: list[list[torch.Tensor]]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for weight, bias in weights:
        linear = nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        layers += [linear, nn.Tanh()]
    return nn.Sequential(*layers)


def _train(weights: list[list[torch.Tensor]], n_microbatches: int, inputs: list[list[torch.Tensor]] | None,
           targets: list[list[torch.Tensor]] | None, activation_shape: list[int], steps: int,
           lr: float) -> dict:  # fmt: skip
    from largemodels.pipeline import one_f_one_b_step

    stage = _stage(weights)
    optimizer = torch.optim.SGD(stage.parameters(), lr=lr)
    seen: dict = {"losses": [], "params": []}
    for step in range(steps):
        optimizer.zero_grad()
        dist.barrier()  # the checker's marker: a step begins
        losses = one_f_one_b_step(
            stage, n_microbatches, None if inputs is None else inputs[step],
            None if targets is None else targets[step], F.mse_loss, tuple(activation_shape),
        )  # fmt: skip
        seen["losses"].append(losses)
        optimizer.step()
        seen["params"].append([p.detach().clone() for p in stage.parameters()])
    return seen


def train(stage_weights: list[list[list[torch.Tensor]]], n_microbatches: int, inputs: list[list[torch.Tensor]],
          targets: list[list[torch.Tensor]], activation_shape: list[int], lr: float) -> dict:  # fmt: skip
    """Rank s trains stage s (stage_weights[s]) for len(inputs) steps; rank 0 gets the inputs, the last rank
    the targets, and no rank anything else's."""
    p, steps = len(stage_weights), len(inputs)
    args = [
        (weights, n_microbatches, inputs if s == 0 else None, targets if s == p - 1 else None,
         activation_shape, steps, lr)
        for s, weights in enumerate(stage_weights)
    ]  # fmt: skip
    return run_ranks(_train, args, package=PACKAGE)
