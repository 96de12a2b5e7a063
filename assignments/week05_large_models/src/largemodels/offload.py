"""Training a model that does not fit the GPU: weights on the host, one layer at a time on the device.

A model's parameters, their gradients and its activations all compete for the device's memory. When the
parameters alone exceed it, keep them in host memory and bring one layer at a time to the device:

    forward:   for each layer: its weights to the device, run it, drop them; keep only the layer's *input*,
               on the host (a "boundary" activation: one tensor per layer, not everything autograd saves)
    backward:  for each layer, last first: its weights to the device again, recompute its forward from the
               saved input (activation checkpointing), backpropagate the gradient of its output, send the
               weights' gradients to the host, drop everything; the input's gradient goes on to the layer
               before

So the device holds one layer's weights and gradients plus a few boundary activations, whatever the depth:
the memory of a model of any size, paid for with one extra forward and two host-device copies of the weights
per step. (`common.memory.offload` does the same for the course's Llama blocks with hooks, prefetching and
pinned memory; here the layers are any modules, and the loop is yours.)

Use `torch.func.functional_call(layer, params, (x,))` to run a layer with device copies of its parameters
without moving the module itself, or move a copy of the layer; either way the modules passed in must end as
they began: parameters on the host, unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def offloaded_step(
    layers: Sequence[nn.Module], x: torch.Tensor, grad: torch.Tensor, device: torch.device | str
) -> torch.Tensor:
    """Forward x through `layers` in order, then backpropagate `grad` (the gradient of the output), with at
    most one layer's parameters on `device` at a time.

    - layers: modules whose parameters and buffers are on the CPU, each taking one tensor and returning one.
      x and grad are on the CPU; every layer's computation runs on `device` ("cuda", "cuda:1" or "cpu").
    - Returns the output of the last layer, on the CPU, detached.
    - Afterwards each parameter's .grad (a CPU tensor) holds the gradient of (output * grad).sum() with
      respect to it, added to what .grad held before (None counts as zero). The parameters themselves are
      unchanged and still on the CPU.
    - Device memory (the grader reads the caching allocator's peak on `device`): the parameters and gradients
      of at most two layers, the layer being computed and optionally the next one (prefetching), plus
      activations of one layer; between layers, activations live on the host.
    """
    # BEGIN SOLUTION: offloaded_step: forward layer by layer keeping host inputs, then backward by recomputation
    device = torch.device(device)
    inputs: list[torch.Tensor] = []  # each layer's input, on the host
    h = x
    with torch.no_grad():
        for layer in layers:
            inputs.append(h.to("cpu"))
            h = torch.func.functional_call(layer, _on(layer, device, grad=False), (h.to(device),))
        output = h.to("cpu")
    del h
    g = grad.to(device)
    for layer, saved in zip(reversed(layers), reversed(inputs), strict=True):
        params = _on(layer, device, grad=True)
        h_in = saved.to(device).requires_grad_(True)
        out = torch.func.functional_call(layer, params, (h_in,))
        torch.autograd.backward(out, g)
        for name, p in layer.named_parameters():
            local = params[name].grad.to("cpu")
            p.grad = local.clone() if p.grad is None else p.grad + local
        g = h_in.grad
        del params, h_in, out
    return output
    # END SOLUTION


def _on(layer: nn.Module, device: torch.device, grad: bool) -> dict[str, torch.Tensor]:
    """Device copies of the layer's parameters (leaves that need a gradient when `grad`) and buffers.
    Private: change or drop it if you like."""
    # BEGIN SOLUTION: _on: detached device copies of the parameters, and of the buffers
    tensors = {name: p.detach().to(device).requires_grad_(grad) for name, p in layer.named_parameters()}
    tensors.update({name: b.to(device) for name, b in layer.named_buffers()})
    return tensors
    # END SOLUTION
