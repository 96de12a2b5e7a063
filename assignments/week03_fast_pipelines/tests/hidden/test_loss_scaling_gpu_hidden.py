"""Hidden tests of `fastpipe.loss_scaling` on a GPU (task loss_scaling_gpu): fp16 training with your scaler.

A small MLP trains on a fixed synthetic classification problem under `torch.autocast(float16)` (fp32 master
weights, fp16 activations and matmul gradients), once with your scaler and once with `torch.amp.GradScaler`,
from the same initial weights on the same batches. Both runs do the same arithmetic: the scale is a power of
two, so scaling and unscaling are exact, and cuBLAS is bitwise reproducible for the same shapes on the same GPU.
So the two runs must skip the same steps, keep the same scale and end at the same loss.
"""

from __future__ import annotations

import copy
from itertools import pairwise

import pytest
import torch
from fastpipe.loss_scaling import DynamicLossScaler, StaticLossScaler

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEVICE = "cuda"
STEPS = 300
BATCH = 256


def problem() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A seeded MLP and STEPS batches of a seeded teacher-labelled classification problem, on the GPU."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 512),
        torch.nn.GELU(),
        torch.nn.Linear(512, 512),
        torch.nn.GELU(),
        torch.nn.Linear(512, 10),
    ).to(DEVICE)
    teacher = torch.randn(64, 10, generator=generator)
    x = torch.randn(STEPS, BATCH, 64, generator=generator)
    y = (x @ teacher).argmax(dim=-1)
    return model, x.to(DEVICE), y.to(DEVICE)


def train(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, scaler, clip: float | None = None
) -> dict:
    """Train a copy of `model` with `scaler`; return the per-step losses and the scale after each step."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses, scales = [], []
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(x[step]), y[step])
        scaler.scale(loss).backward()
        if clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
        scales.append(scaler.get_scale())
    final = torch.nn.functional.cross_entropy(model(x[-8:].flatten(0, 1)).float(), y[-8:].flatten()).item()
    return {"losses": losses, "scales": scales, "final": final}


def assert_trained_alike(ours: dict, reference: dict) -> None:
    # Premise: the run trains at all (the loss on the last batches falls well below its starting value).
    assert reference["final"] < 0.5 * reference["losses"][0]
    assert ours["final"] < 0.5 * ours["losses"][0], f"your run did not train: final loss {ours['final']:.3f}"
    # Identical arithmetic would give identical losses; 1% leaves room for a scaler that rounds differently
    # (e.g. divides by the scale instead of multiplying by its inverse), while a scaler that lets an inf/NaN
    # step through ends at NaN, and one that forgets to unscale takes steps 2**k times too large and diverges.
    assert ours["final"] == pytest.approx(reference["final"], rel=1e-2)


@pytest.mark.parametrize("clip", [None, 1.0], ids=["no clipping", "clipping"])
def test_dynamic_scaler_trains_like_gradscaler(clip: float | None) -> None:
    model, x, y = problem()
    # 2**24 overflows fp16 gradients at first, so the run backs off; growth_interval=50 makes it grow again.
    kwargs = dict(init_scale=2.0**24, growth_interval=50)
    reference = train(model, x, y, torch.amp.GradScaler(DEVICE, **kwargs), clip)
    ours = train(model, x, y, DynamicLossScaler(**kwargs), clip)
    scales = [kwargs["init_scale"], *reference["scales"]]
    assert any(b < a for a, b in pairwise(scales)), "premise: the reference run must back off"
    assert any(b > a for a, b in pairwise(scales)), "premise: the reference run must grow"
    assert ours["scales"] == reference["scales"], "the scale must follow GradScaler's step by step"
    assert_trained_alike(ours, reference)


def test_static_scaler_trains_like_gradscaler_with_fixed_scale() -> None:
    model, x, y = problem()
    # 2**8 never overflows here; GradScaler with growth_interval > STEPS keeps that same scale all run.
    reference = train(
        model, x, y, torch.amp.GradScaler(DEVICE, init_scale=2.0**8, growth_interval=10 * STEPS)
    )
    assert set(reference["scales"]) == {2.0**8}, "premise: the fixed scale must not overflow"
    ours = train(model, x, y, StaticLossScaler(2.0**8))
    assert set(ours["scales"]) == {2.0**8}
    assert_trained_alike(ours, reference)


def test_static_scaler_with_overflowing_scale_never_steps() -> None:
    """2**40 overflows every fp16 gradient: every step must be skipped, so the weights never change."""
    model, x, y = problem()
    scaler = StaticLossScaler(2.0**40)
    net = copy.deepcopy(model)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for step in range(20):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(net(x[step]), y[step])
        scaler.scale(loss).backward()
        assert scaler.step(optimizer) is False, f"step {step} was taken with inf/NaN gradients"
        scaler.update()
    for before, after in zip(model.parameters(), net.parameters(), strict=True):
        assert torch.equal(before, after)
