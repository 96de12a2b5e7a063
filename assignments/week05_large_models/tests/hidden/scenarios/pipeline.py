"""Runs in the submission's worker: the student's 1F1B step on each stage, through the grader's hub.

Rank s builds its stage (linear layers, each followed by tanh) from the weights the checker sent it, and runs
several training steps: zero the gradients, the scenario's barrier (the checker's marker between steps), the
student's `one_f_one_b_step`, an SGD step. It returns each step's losses (last stage), parameters after each
step, and the most micro-batches whose activations the stage held at once; the hub's log holds every send and
receive. The checker trains the whole model on one process itself.

The stage the student drives is the grader's `CountedStage`: every tensor autograd saves in one of its forward
calls (one micro-batch) is packed with a token, so the token lives exactly as long as that micro-batch's saved
activations do (until its backward releases them, or its graph is dropped). Counting live tokens is counting
micro-batches in flight, which is what 1F1B bounds and GPipe does not. The count runs in the rank, beside the
student's code: a submission could unwrap the stage or patch the count, deliberate work plain in its source.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from common.grading.ranks import run_ranks

PACKAGE = "largemodels"


class _InFlight:
    """One forward call's saved activations: counted while autograd still holds a tensor the call saved."""

    def __init__(self, stage: CountedStage) -> None:
        self.stage = stage
        stage.alive += 1

    def __del__(self) -> None:
        self.stage.alive -= 1


def _pack(token: _InFlight, saved: torch.Tensor) -> tuple[_InFlight, torch.Tensor]:
    # detached: a saved output packed with its own grad_fn would make a cycle that outlives a dropped graph
    return token, saved.detach()


def _unpack(packed: tuple[_InFlight, torch.Tensor]) -> torch.Tensor:
    return packed[1]


class CountedStage(nn.Module):
    """The stage's layers; `peak` is the most forward calls whose saved activations were alive at once."""

    def __init__(self, layers: nn.Sequential) -> None:
        super().__init__()
        self.layers = layers
        self.alive = 0  # forward calls whose saved activations autograd still holds
        self.peak = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        token = _InFlight(self)
        with torch.autograd.graph.saved_tensors_hooks(functools.partial(_pack, token), _unpack):
            y = self.layers(x)
        del token  # from here on only the saved tensors hold it (none under no_grad: then it is gone now)
        self.peak = max(self.peak, self.alive)
        return y


def _stage(weights: list[list[torch.Tensor]]) -> CountedStage:
    layers: list[nn.Module] = []
    for weight, bias in weights:
        linear = nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        layers += [linear, nn.Tanh()]
    return CountedStage(nn.Sequential(*layers))


def _train(weights: list[list[torch.Tensor]], n_microbatches: int, inputs: list[list[torch.Tensor]] | None,
           targets: list[list[torch.Tensor]] | None, activation_shape: list[int], steps: int,
           lr: float) -> dict:  # fmt: skip
    from largemodels.pipeline import one_f_one_b_step

    stage = _stage(weights)
    optimizer = torch.optim.SGD(stage.parameters(), lr=lr)
    seen: dict = {"losses": [], "params": [], "in_flight": []}
    for step in range(steps):
        optimizer.zero_grad()
        stage.peak = stage.alive  # a step's own peak (what an earlier step left alive counts too)
        dist.barrier()  # the checker's marker: a step begins
        losses = one_f_one_b_step(
            stage, n_microbatches, None if inputs is None else inputs[step],
            None if targets is None else targets[step], F.mse_loss, tuple(activation_shape),
        )  # fmt: skip
        seen["losses"].append(losses)
        seen["in_flight"].append(stage.peak)
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
