"""Training loops that drive a loss scaler: the student's in the worker, `torch.amp.GradScaler` in the checker.

The loss is `sum(p * g)` over the parameters, so backpropagating `scaler.scale(loss)` gives each parameter
exactly `scale * g`: the tests choose the true gradients `g` of every step. Each function takes the scaler as
an argument (nothing here imports the submission) and returns raw observations: scales, what `step()`
returned, parameters after every step, the classes of an exception. The tests decide what they mean.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def error_of(action: Callable[[], object]) -> dict | None:
    """None if `action()` returns; else the classes (most derived first) and message of what it raised."""
    try:
        action()
    except Exception as error:
        return {"classes": [k.__name__ for k in type(error).__mro__], "message": str(error)[:300]}
    return None


def train(scaler, grads_per_step: list[list[torch.Tensor]], clip: float | None = None) -> list[tuple]:
    """Momentum SGD from zeros on the given true gradients, with `scaler`; unscale_ and clip if `clip`.

    Returns, per step: (the scale before it, the parameters after it, the scale after `update()`).
    """
    params = [torch.nn.Parameter(torch.zeros_like(grad)) for grad in grads_per_step[0]]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    records = []
    for grads in grads_per_step:
        optimizer.zero_grad()
        loss = sum((p * g).sum() for p, g in zip(params, grads, strict=True))
        scale_before = scaler.get_scale()
        scaler.scale(loss).backward()
        if clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(optimizer)
        scaler.update()
        records.append((scale_before, [p.detach().clone() for p in params], scaler.get_scale()))
    return records


def train_two_optimizers(scaler, grads_per_step: list[list[torch.Tensor]]) -> list[tuple]:
    """Two parameters, one stepped by SGD and one by Adam, sharing `scaler`.

    Returns, per step: (the scale after it, [the first parameter, the second parameter]).
    """
    first, second = torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(5))
    optimizers = [torch.optim.SGD([first], lr=0.1), torch.optim.Adam([second], lr=0.1)]
    history = []
    for grads in grads_per_step:
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss = (first * grads[0]).sum() + (second * grads[1]).sum()
        scaler.scale(loss).backward()
        for optimizer in optimizers:
            scaler.step(optimizer)
        scaler.update()
        history.append((scaler.get_scale(), [first.detach().clone(), second.detach().clone()]))
    return history


def skip_step(scaler, grad: torch.Tensor) -> tuple:
    """One step of momentum SGD from ones with gradient `grad` (holding an inf or NaN).

    Returns (what step() returned, the parameter after it, the number of optimizer state entries of the
    parameter, the scale after update()).
    """
    param = torch.nn.Parameter(torch.ones_like(grad))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    scaler.scale((param * grad).sum()).backward()
    stepped = scaler.step(optimizer)
    after = param.detach().clone()
    scaler.update()
    return stepped, after, len(optimizer.state[param]), scaler.get_scale()


def scale_loss(scaler, dtype: str) -> dict:
    """scale() of the loss `(w * [1, 2, 4]).sum()` in `dtype` with w = [0.5, -2, 3], then its backward."""
    weight = torch.nn.Parameter(torch.tensor([0.5, -2.0, 3.0]))
    loss = (
        weight.to(getattr(torch, dtype)) * torch.tensor([1.0, 2.0, 4.0], dtype=getattr(torch, dtype))
    ).sum()
    scaled = scaler.scale(loss)
    observed = {"loss": loss.detach().clone(), "scaled": scaled.detach().clone()}
    scaled.backward()
    observed["grad"] = weight.grad.clone()
    return observed


def unscale(scaler) -> dict:
    """unscale_() with gradients [1, -3, 0.125] (and an unused parameter), step, update, then with a NaN."""
    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([used, unused], lr=1.0)
    scaler.scale((used * torch.tensor([1.0, -3.0, 0.125])).sum()).backward()
    observed = {"finite": scaler.unscale_(optimizer), "grad": used.grad.clone(), "unused_grad": unused.grad}
    observed["stepped"] = scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    scaler.scale((used * torch.tensor([1.0, float("nan"), 0.0])).sum()).backward()
    observed["finite_with_nan"] = scaler.unscale_(optimizer)
    return observed


def unscale_twice(scaler) -> dict:
    """unscale_() twice in one iteration; then step, update and one more iteration's unscale_()."""
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scaler.scale(param.sum()).backward()
    scaler.unscale_(optimizer)
    observed = {"second": error_of(lambda: scaler.unscale_(optimizer)), "grad": param.grad.clone()}
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    scaler.scale(param.sum()).backward()
    observed["next_iteration"] = scaler.unscale_(optimizer)
    return observed


def update_twice(scaler) -> dict:
    """One iteration, then a second update() without a step in between."""
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scaler.scale(param.sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    return {"second": error_of(scaler.update), "scale": scaler.get_scale()}


FORBIDDEN = ("GradScaler", "_amp_foreach_non_finite_check_and_unscale_", "_amp_update_scale_")


def train_watching_for_grad_scaler(scaler, grads_per_step: list[list[torch.Tensor]]) -> tuple:
    """`train`, with GradScaler and its private kernels replaced by recorders. Returns (records, calls)."""
    calls = []

    def recorder(name: str) -> Callable[..., None]:
        def record(*args, **kwargs) -> None:
            calls.append(name)
            raise AssertionError(f"{name} is not to be used")

        return record

    saved = [(torch.amp, "GradScaler"), (torch.amp.grad_scaler, "GradScaler")]
    saved += [(torch, name) for name in FORBIDDEN[1:]]
    originals = [getattr(module, name) for module, name in saved]
    for module, name in saved:
        setattr(module, name, recorder(name))
    try:
        records = train(scaler, grads_per_step)
    finally:
        for (module, name), original in zip(saved, originals, strict=True):
            setattr(module, name, original)
    return records, calls
