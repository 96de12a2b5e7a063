"""Public tests of `fastpipe.loss_scaling`; the hidden tests check the same behaviour on more cases.

The reference is `torch.amp.GradScaler`, which runs on the CPU too: fed the same gradients, your scaler must
keep the same scale and take the same steps.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from fastpipe.loss_scaling import DynamicLossScaler, StaticLossScaler

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def train_synthetic(scaler, pattern: str) -> list[tuple[float, bool]]:
    """Steps on the loss sum(p * g): '.' a finite g, 'I' a g holding inf. Returns (scale after, stepped) per step."""
    generator = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.zeros(6))
    optimizer = torch.optim.SGD([param], lr=0.1)
    history = []
    for kind in pattern:
        grad = torch.randn(6, generator=generator)
        if kind == "I":
            grad[3] = math.inf
        optimizer.zero_grad()
        before = param.detach().clone()
        scaler.scale((param * grad).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
        history.append((scaler.get_scale(), not torch.equal(before, param.detach())))
    return history


def test_dynamic_scaler_matches_gradscaler() -> None:
    pattern = "...I.....II......I..."
    kwargs = dict(init_scale=2.0**10, growth_interval=3)
    ours = train_synthetic(DynamicLossScaler(**kwargs), pattern)
    reference = train_synthetic(torch.amp.GradScaler("cpu", **kwargs), pattern)
    assert ours == reference


def test_overflow_skips_the_step_and_backs_off() -> None:
    scaler = DynamicLossScaler(init_scale=2.0**8, growth_interval=100)
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scaler.scale((param * torch.tensor([1.0, math.inf, 2.0])).sum()).backward()
    assert scaler.step(optimizer) is False
    scaler.update()
    assert torch.equal(param.detach(), torch.ones(3))
    assert scaler.get_scale() == 2.0**7


def test_static_scaler_unscales_and_keeps_its_scale() -> None:
    scaler = StaticLossScaler(2.0**6)
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=1.0)
    for _ in range(3):
        optimizer.zero_grad()
        scaler.scale((param * torch.tensor([1.0, -2.0, 0.5])).sum()).backward()
        assert scaler.unscale_(optimizer) is True
        torch.testing.assert_close(param.grad, torch.tensor([1.0, -2.0, 0.5]), rtol=0, atol=0)
        assert scaler.step(optimizer) is True
        scaler.update()
        assert scaler.get_scale() == 2.0**6
    torch.testing.assert_close(param.detach(), torch.tensor([-2.0, 7.0, -0.5]), rtol=0, atol=0)


def test_fp16_training_matches_gradscaler() -> None:
    """Mixed-precision training of a small MLP: the same losses as with GradScaler, and the loss goes down."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)).to(DEVICE)
    x = torch.randn(512, 32, device=DEVICE)
    y = (x[:, :4] + 0.1 * torch.randn(512, 4, device=DEVICE)).argmax(dim=1)

    def train(scaler) -> list[float]:
        net = copy.deepcopy(model)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
        losses = []
        for _ in range(60):
            optimizer.zero_grad()
            with torch.autocast(DEVICE, dtype=torch.float16):
                loss = torch.nn.functional.cross_entropy(net(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
        return losses

    # 2**24 is too large for fp16 gradients: the first steps overflow and both scalers must back off.
    kwargs = dict(init_scale=2.0**24, growth_interval=10)
    ours = train(DynamicLossScaler(**kwargs))
    reference = train(torch.amp.GradScaler(DEVICE, **kwargs))
    assert ours[-1] < 0.5 * ours[0], "the loss should at least halve in 60 steps"
    # The two runs do the same arithmetic (powers-of-two scales unscale exactly), so only rounding differs.
    assert ours[-1] == pytest.approx(reference[-1], rel=1e-2)
