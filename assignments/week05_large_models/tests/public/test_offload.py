"""Public tests of `largemodels.offload`, on the CPU: the offloaded step equals the plain model's.

The hidden test runs the same function on a GPU, on 8 layers of 4096 x 4096 (512 MiB of parameters) under a
384 MiB budget (the caching allocator's peak on the GPU); it also checks that gradients add to those already in
.grad and that the parameters end on the CPU.
"""

from __future__ import annotations

import copy

import torch
from largemodels.offload import offloaded_step
from torch import nn


def layers() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(6, 6), nn.GELU()).double() for _ in range(4)]


def test_equals_the_plain_model() -> None:
    """On the CPU: offloaded_step(..., "cpu") runs the same code path as on a GPU, with copies that do nothing."""
    ours, plain = layers(), layers()
    for layer in ours:  # gradients already there: the step adds to them
        for p in layer.parameters():
            p.grad = torch.full_like(p, 0.5)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    grad = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    before = [copy.deepcopy(p.detach()) for layer in ours for p in layer.parameters()]
    out = offloaded_step(ours, x, grad, "cpu")
    expected = nn.Sequential(*plain)(x)
    expected.backward(grad)
    torch.testing.assert_close(out, expected.detach())
    for mine, theirs, old in zip([p for m in ours for p in m.parameters()], [p for m in plain for p in m.parameters()],
                                 before, strict=True):  # fmt: skip
        assert mine.device.type == "cpu"
        torch.testing.assert_close(mine.detach(), old)  # the parameters are unchanged
        torch.testing.assert_close(mine.grad, theirs.grad + 0.5)
