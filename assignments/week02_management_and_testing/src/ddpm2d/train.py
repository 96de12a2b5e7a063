"""A denoising diffusion probabilistic model (DDPM, Ho et al. 2020) on 2-D points, in one file.

The forward process adds Gaussian noise to a data point x0 over `num_steps` steps with a linear schedule of
variances beta_t; its closed form is

    q(x_t | x0) = N( sqrt(alpha_bar_t) * x0,  (1 - alpha_bar_t) * I ),   alpha_bar_t = prod_{s<=t} (1 - beta_s).

A small MLP learns to predict the noise that was added (the "simple" loss of the paper), and sampling runs
the reverse process from pure noise:

    x_{t-1} = 1/sqrt(alpha_t) * (x_t - beta_t / sqrt(1 - alpha_bar_t) * eps_theta(x_t, t)) + sqrt(beta_t) * z,

with z ~ N(0, I) for t > 0 and z = 0 at t = 0. Time steps are 0-based here: t = 0 .. num_steps - 1.

`train(config, points, logger)` is the training entry point; `python -m ddpm2d.train` is the pipeline's
`train` stage (see `main`).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import yaml
from torch import nn


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run. Two runs with the same config and data give the same model."""

    num_steps: int = 50  # diffusion steps T
    beta_start: float = 1e-4  # beta_0 of the linear schedule
    beta_end: float = 0.2  # beta_{T-1}
    hidden: int = 64  # width of the denoiser's hidden layers
    epochs: int = 4
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if min(self.num_steps, self.hidden, self.epochs, self.batch_size) < 1:
            raise ValueError("num_steps, hidden, epochs and batch_size must be positive")


@dataclass(frozen=True)
class Schedule:
    """The noise schedule, one entry per time step: beta_t, alpha_t = 1 - beta_t, alpha_bar_t = prod alpha_s."""

    betas: torch.Tensor
    alphas: torch.Tensor
    alpha_bars: torch.Tensor

    @property
    def num_steps(self) -> int:
        return len(self.betas)


def make_schedule(num_steps: int, beta_start: float, beta_end: float) -> Schedule:
    """A linear schedule of `num_steps` betas from `beta_start` to `beta_end` (float32, on the CPU)."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float32)
    alphas = 1.0 - betas
    return Schedule(betas, alphas, torch.cumprod(alphas, dim=0))


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """x_t drawn from q(x_t | x0) with the given noise: sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise.

    x0 and noise have shape (B, 2); t holds B time steps (int64, shape (B,)), one per point."""
    alpha_bar = schedule.alpha_bars.to(x0.device)[t].unsqueeze(-1)  # (B, 1): one coefficient per point
    # BEGIN SOLUTION: schedule_coefficient: the noise is scaled by the variance 1 - alpha_bar, not its square root
    return alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise
    # STARTER
    # return alpha_bar.sqrt() * x0 + (1.0 - alpha_bar) * noise
    # END SOLUTION


class Denoiser(nn.Module):
    """eps_theta(x_t, t): an MLP on the point and the time step scaled to [0, 1)."""

    def __init__(self, num_steps: int, hidden: int = 64) -> None:
        super().__init__()
        self.num_steps = num_steps
        self.net = nn.Sequential(
            nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        time = (t.to(x.dtype) / self.num_steps).unsqueeze(-1)  # (B,) -> (B, 1)
        return self.net(torch.cat([x, time], dim=-1))  # (B, 3) -> (B, 2)


class Adam:
    """Adam (Kingma & Ba, 2015), written out. torch.optim.Adam computes the same; its constructor imports
    torch._dynamo, about 5 s of CPU in every fresh process, and your tests run in many fresh processes."""

    def __init__(
        self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.betas, self.eps, self.steps = lr, betas, eps, 0
        self.first = [torch.zeros_like(p) for p in self.params]  # running mean of the gradients
        self.second = [torch.zeros_like(p) for p in self.params]  # running mean of their squares

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        for p, first, second in zip(self.params, self.first, self.second, strict=True):
            if p.grad is None:
                continue
            first.mul_(beta1).add_(p.grad, alpha=1 - beta1)
            second.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denominator = (second / (1 - beta2**self.steps)).sqrt_().add_(self.eps)
            p.addcdiv_(first, denominator, value=-self.lr / (1 - beta1**self.steps))


def diffusion_loss(model: nn.Module, x0: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """The simple DDPM loss of a batch x0 (B, 2): draw t uniformly from 0 .. T-1 and noise ~ N(0, I) (from
    torch's global generator), noise x0 with `q_sample`, and return the mean squared error between
    `model(x_t, t)` and the noise, averaged over every element."""
    t = torch.randint(0, schedule.num_steps, (x0.shape[0],), device=x0.device)
    # BEGIN SOLUTION: noise_distribution: the noise is uniform on [0, 1), not standard normal
    noise = torch.randn_like(x0)
    # STARTER
    # noise = torch.rand_like(x0)
    # END SOLUTION
    x_t = q_sample(x0, t, noise, schedule)
    return ((model(x_t, t) - noise) ** 2).mean()


@torch.no_grad()
def p_sample(
    model: nn.Module, x: torch.Tensor, t: int, schedule: Schedule, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One reverse step from x_t (B, 2) at time step `t` to x_{t-1} (see the module's docstring).

    z has the shape of x, one independent standard normal number per coordinate, drawn in float32 on the CPU
    from `generator` (torch's global generator if None) with `torch.randn(x.shape, generator=generator)`, then
    moved to x's device and dtype; no z is drawn at t = 0."""
    beta, alpha, alpha_bar = (float(v[t]) for v in (schedule.betas, schedule.alphas, schedule.alpha_bars))
    steps = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
    mean = (x - beta / math.sqrt(1.0 - alpha_bar) * model(x, steps)) / math.sqrt(alpha)
    if t == 0:
        return mean
    # BEGIN SOLUTION: noise_broadcast: one noise number per point is broadcast to both coordinates
    z = torch.randn(x.shape, generator=generator).to(x)
    # STARTER
    # z = torch.randn(x.shape[0], 1, generator=generator).to(x)
    # END SOLUTION
    return mean + math.sqrt(beta) * z


@torch.no_grad()
def sample(
    model: nn.Module,
    n: int,
    schedule: Schedule,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`n` points (n, 2) with the model's `device` and `dtype`: x_{T-1} ~ N(0, I), drawn in float32 on the CPU
    from `generator` with `torch.randn((n, 2), generator=generator)` and moved to `device` and `dtype`, then
    `p_sample` from t = T-1 down to 0 with the same generator."""
    # BEGIN SOLUTION: device_mismatch: the starting noise stays a float32 CPU tensor whatever the model's device and dtype
    x = torch.randn((n, 2), generator=generator).to(device=device, dtype=dtype)
    # STARTER
    # x = torch.randn((n, 2), generator=generator)
    # END SOLUTION
    for t in reversed(range(schedule.num_steps)):
        x = p_sample(model, x, t, schedule, generator)
    return x


class Logger(Protocol):
    """What `train` reports to: W&B's `wandb.config.update` and `wandb.log`, in two methods."""

    def log_config(self, config: dict[str, Any]) -> None: ...

    def log(self, metrics: dict[str, float], step: int) -> None: ...


class NullLogger:
    """Logs nothing."""

    def log_config(self, config: dict[str, Any]) -> None:
        pass

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass


class JsonLinesLogger:
    """One JSON object per line: {"config": {...}} first, then {"step": s, **metrics}."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def _write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as out:
            out.write(json.dumps(record) + "\n")

    def log_config(self, config: dict[str, Any]) -> None:
        self._write({"config": config})

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._write({"step": step, **metrics})


class WandbLogger:
    """Weights & Biases, offline unless WANDB_MODE says otherwise (`wandb sync` uploads a run later)."""

    def __init__(self, project: str = "effdl-week02", **init: Any) -> None:
        import wandb

        self.run = wandb.init(project=project, mode=init.pop("mode", "offline"), **init)

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        self.run.finish()


def train(
    config: TrainConfig, points: torch.Tensor, logger: Logger | None = None
) -> tuple[Denoiser, dict[str, list[float]]]:
    """Train a Denoiser on `points` (N, 2) with Adam; return it and the history of the run.

    Every run starts from `config.seed` (torch's global generator is seeded with it): the same config and
    points give the same model and history, whatever ran before. Each epoch visits the points in a new random
    order, in batches of `config.batch_size` (the last one may be smaller).

    history["step_loss"]: the loss of every optimizer step, in order;
    history["epoch_loss"]: per epoch, the mean loss over the epoch's points (each batch weighted by its size).

    The logger gets `log_config(asdict(config))` once, before the first step; `log({"train/loss": loss},
    step=s)` after every optimizer step s = 0, 1, ...; and `log({"train/epoch_loss": epoch_loss, "epoch":
    e}, step=s)` at the end of epoch e = 0, 1, ..., where s is the epoch's last step.
    """
    logger = logger or NullLogger()
    # BEGIN SOLUTION: missing_seed: nothing seeds the run, so two runs of one config differ
    torch.manual_seed(config.seed)
    # STARTER
    # END SOLUTION
    # BEGIN SOLUTION: log_config: the config is never logged
    logger.log_config(asdict(config))
    # STARTER
    # END SOLUTION
    schedule = make_schedule(config.num_steps, config.beta_start, config.beta_end)
    model = Denoiser(config.num_steps, config.hidden)
    optimizer = Adam(model.parameters(), lr=config.lr)
    history: dict[str, list[float]] = {"step_loss": [], "epoch_loss": []}
    step = -1
    for _ in range(config.epochs):
        order = torch.randperm(len(points))
        total = 0.0
        for start in range(0, len(points), config.batch_size):
            batch = points[order[start : start + config.batch_size]]
            loss = diffusion_loss(model, batch, schedule)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            history["step_loss"].append(loss.item())
            # BEGIN SOLUTION: epoch_metric: the epoch's loss sums batch means, so it is off by the batch size
            total += loss.item() * len(batch)
            # STARTER
            # total += loss.item()
            # END SOLUTION
            # BEGIN SOLUTION: log_steps: the step losses are never logged
            logger.log({"train/loss": history["step_loss"][-1]}, step=step)
            # STARTER
            # END SOLUTION
        history["epoch_loss"].append(total / len(points))
        # BEGIN SOLUTION: log_epochs: the epoch losses are never logged
        epoch = len(history["epoch_loss"]) - 1
        logger.log({"train/epoch_loss": history["epoch_loss"][-1], "epoch": epoch}, step=step)
        # STARTER
        # END SOLUTION
    return model, history


def load_config(params: Path) -> TrainConfig:
    """The `train` section of a params.yaml as a TrainConfig."""
    return TrainConfig(**yaml.safe_load(Path(params).read_text())["train"])


def main(argv: list[str] | None = None) -> None:
    """The pipeline's `train` stage: train on the prepared points, save the model and the final metrics."""
    parser = argparse.ArgumentParser(description="Train the 2-D DDPM (the `train` stage).")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="its `train` section")
    parser.add_argument("--data", type=Path, default=Path("data/points.npy"), help="points from ddpm2d.data")
    parser.add_argument("--model", type=Path, default=Path("model.pt"), help="where to save the state dict")
    parser.add_argument("--metrics", type=Path, default=Path("metrics.json"), help="final metrics (JSON)")
    parser.add_argument("--log", type=Path, default=None, help="also log to this JSON-lines file")
    parser.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (offline)")
    args = parser.parse_args(argv)
    config = load_config(args.params)
    points = torch.from_numpy(np.load(args.data))
    logger: Logger = JsonLinesLogger(args.log) if args.log else NullLogger()
    if args.wandb:
        logger = WandbLogger(config=asdict(config))
    model, history = train(config, points, logger)
    torch.save(model.state_dict(), args.model)
    metrics = {"final_epoch_loss": history["epoch_loss"][-1], "steps": len(history["step_loss"])}
    args.metrics.write_text(json.dumps(metrics, indent=2) + "\n")
    if isinstance(logger, WandbLogger):
        logger.finish()


if __name__ == "__main__":
    main()
