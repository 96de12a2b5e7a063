"""Runs in the submission's worker: the student's `ddpm2d.train` on small inputs. Observations only.

The models and the logger are defined here, so the checker can build the same models and compute what the
student's code should have returned. Nothing here imports the student's package at module level.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Constant(nn.Module):
    """A denoiser that predicts `value` for every coordinate: the loss then measures the noise itself."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, self.value)


class Affine(nn.Module):
    """A fixed denoiser, eps = x W^T + b + t / 100, that the checker can evaluate too."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([[0.3, -0.2], [0.1, 0.5]]))
        self.bias = nn.Parameter(torch.tensor([0.05, -0.1]))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T.to(x) + self.bias.to(x) + 0.01 * t.to(x.dtype)[:, None]


# One call the logger got: ("config", the config, NO_STEP) or ("log", the metrics, the step).
LoggerCall = tuple[str, dict[str, int | float | str | bool], int | str]
NO_STEP = -1

# What the checker accepts back from the worker, exactly (see common.grading.client.expect).
TrainRun = tuple[list[float], list[float], list[torch.Tensor]]  # step losses, epoch losses, parameters
LoggedRun = tuple[list[float], list[float], list[LoggerCall]]  # step losses, epoch losses, logger calls


class RecordingLogger:
    """The logger the grader passes to `train`: it keeps every call, as data."""

    def __init__(self) -> None:
        self.calls: list[LoggerCall] = []

    def log_config(self, config: dict[str, Any]) -> None:
        self.calls.append(("config", _plain(config), NO_STEP))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.calls.append(("log", _plain(metrics), step if type(step) is int else repr(step)[:40]))


def _plain(mapping: Any) -> dict[str, int | float | str | bool]:
    """Keys and values as plain data; anything else as the name of its type (the checker says what came)."""
    if type(mapping) is not dict:
        return {"<not a dict>": type(mapping).__name__}
    return {
        str(key): value if type(value) in (int, float, str, bool) else f"<{type(value).__name__}>"
        for key, value in mapping.items()
    }


def _train_module() -> Any:
    import ddpm2d.train

    return ddpm2d.train


def q_sample(
    x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, steps: int, b0: float, b1: float
) -> torch.Tensor:
    module = _train_module()
    return module.q_sample(x0, t, noise, module.make_schedule(steps, b0, b1))


def noise_losses(n: int, seed: int) -> list[float]:
    """diffusion_loss of `n` zero points for a denoiser predicting 0, then 1: E[noise^2] and E[(1 - noise)^2]."""
    module = _train_module()
    schedule = module.make_schedule(50, 1e-4, 0.2)
    torch.manual_seed(seed)
    x0 = torch.zeros(n, 2)
    return [float(module.diffusion_loss(Constant(value), x0, schedule)) for value in (0.0, 1.0)]


def p_sample(x: torch.Tensor, t: int, seed: int, steps: int) -> torch.Tensor:
    module = _train_module()
    schedule = module.make_schedule(steps, 1e-4, 0.2)
    return module.p_sample(Affine(), x, t, schedule, torch.Generator().manual_seed(seed))


def sample_float64(n: int, seed: int) -> torch.Tensor:
    module = _train_module()
    schedule = module.make_schedule(10, 1e-4, 0.2)
    return module.sample(
        Affine().double(), n, schedule, torch.Generator().manual_seed(seed), dtype=torch.float64
    )


def train_run(config: dict[str, Any], points: torch.Tensor, global_seed: int) -> TrainRun:
    """A training run after seeding torch's global generator with `global_seed` (the run must not care)."""
    module = _train_module()
    torch.manual_seed(global_seed)
    model, history = module.train(module.TrainConfig(**config), points)
    params = [p.detach().clone() for p in model.parameters()]
    return list(history["step_loss"]), list(history["epoch_loss"]), params


def train_logged(config: dict[str, Any], points: torch.Tensor) -> LoggedRun:
    """A training run with the recording logger: the history and every call the logger got."""
    module = _train_module()
    logger = RecordingLogger()
    _, history = module.train(module.TrainConfig(**config), points, logger)
    return list(history["step_loss"]), list(history["epoch_loss"]), logger.calls
