"""fp16 training of a small MLP on the GPU with a given loss scaler: the student's in the worker,
`torch.amp.GradScaler` in the checker, from the same seeded weights on the same seeded batches.

Nothing here imports the submission: the scaler is an argument. The results are raw observations.
"""

from __future__ import annotations

import torch

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


def train(scaler, clip: float | None = None) -> dict:
    """Train the problem's model with `scaler` under autocast(float16).

    Returns the loss of every step, the scale after every step, and the final loss on the last 8 batches.
    """
    model, x, y = problem()
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


def steps_taken(scaler, steps: int) -> dict:
    """`steps` steps with `scaler`; what step() returned each time, and whether the weights ever changed."""
    model, x, y = problem()
    initial = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    returned = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(x[step]), y[step])
        scaler.scale(loss).backward()
        returned.append(scaler.step(optimizer))
        scaler.update()
    changed = any(not torch.equal(a, b) for a, b in zip(initial, model.parameters(), strict=True))
    return {"returned": returned, "weights_changed": changed}
