"""Tests of ddpm2d.train: the forward process, the loss, sampling, training, tracking and the train stage.

Run them from the assignment folder: `pytest src/ddpm2d/tests`. Keep them fast (a few seconds on a laptop CPU)
and deterministic: the grader runs them many times.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from ddpm2d.data import make_points
from ddpm2d.train import (
    Denoiser,
    JsonLinesLogger,
    TrainConfig,
    diffusion_loss,
    main,
    make_schedule,
    p_sample,
    q_sample,
    sample,
    train,
)

SCHEDULE = make_schedule(50, 1e-4, 0.2)
SMALL = TrainConfig(num_steps=10, hidden=16, epochs=2, batch_size=16, seed=0)


def moons(n: int = 64) -> torch.Tensor:
    return torch.from_numpy(make_points(n, seed=0))


class Constant(nn.Module):
    """A denoiser that predicts the same number for every coordinate."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, self.value)


class Recorder:
    """A logger that remembers every call."""

    def __init__(self) -> None:
        self.configs: list[dict] = []
        self.records: list[tuple[dict, int]] = []

    def log_config(self, config: dict) -> None:
        self.configs.append(config)

    def log(self, metrics: dict, step: int) -> None:
        self.records.append((metrics, step))


def test_the_schedule_is_linear_and_cumulative() -> None:
    schedule = make_schedule(5, 0.1, 0.5)
    torch.testing.assert_close(schedule.betas, torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]))
    torch.testing.assert_close(schedule.alpha_bars, torch.cumprod(1 - schedule.betas, dim=0))


def test_a_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="beta_start"):
        TrainConfig(beta_start=0.5, beta_end=0.1)
    with pytest.raises(ValueError, match="positive"):
        TrainConfig(epochs=0)


def test_q_sample_matches_the_closed_form() -> None:
    # BEGIN SOLUTION: wrong_q_sample_test: expects x0 back exactly at t = 0, which no schedule gives
    x0, noise = torch.randn(8, 2), torch.randn(8, 2)
    t = torch.tensor([0, 3, 7, 12, 20, 33, 41, 49])
    alpha_bar = SCHEDULE.alpha_bars[t][:, None]
    expected = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    torch.testing.assert_close(q_sample(x0, t, noise, SCHEDULE), expected)
    # STARTER
    # x0, noise = torch.randn(8, 2), torch.randn(8, 2)
    # t = torch.zeros(8, dtype=torch.int64)
    # assert torch.equal(q_sample(x0, t, noise, SCHEDULE), x0)
    # END SOLUTION


# BEGIN SOLUTION: missing_noise_test: no test of the training noise
def test_the_training_noise_is_standard_normal() -> None:
    torch.manual_seed(0)
    x0 = torch.zeros(20_000, 2)
    # Predicting 0 costs E[noise^2] = 1; predicting 1 costs E[(1 - noise)^2] = 2 for standard normal noise.
    assert abs(diffusion_loss(Constant(0.0), x0, SCHEDULE).item() - 1.0) < 0.05
    assert abs(diffusion_loss(Constant(1.0), x0, SCHEDULE).item() - 2.0) < 0.05


def test_p_sample_adds_independent_noise_to_each_coordinate() -> None:
    g = torch.Generator().manual_seed(0)
    t = 5
    z = p_sample(Constant(0.0), torch.zeros(4000, 2), t, SCHEDULE, g) / math.sqrt(SCHEDULE.betas[t])
    assert abs(torch.corrcoef(z.T)[0, 1].item()) < 0.1, "the two coordinates got the same noise"
    assert abs(z.std().item() - 1.0) < 0.1
    x = torch.randn(16, 2)  # no noise in the last step
    torch.testing.assert_close(p_sample(Constant(0.0), x, 0, SCHEDULE), x / math.sqrt(SCHEDULE.alphas[0]))


def test_sampling_follows_the_models_dtype() -> None:
    schedule = make_schedule(10, 1e-4, 0.2)
    model = Denoiser(10, hidden=16).double()  # what a CPU can check of "the model's device and dtype"
    points = sample(model, 8, schedule, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert points.dtype == torch.float64 and points.shape == (8, 2)


def test_sampling_is_reproducible_with_a_generator() -> None:
    model = Denoiser(10, hidden=16)
    schedule = make_schedule(10, 1e-4, 0.2)
    first = sample(model, 32, schedule, torch.Generator().manual_seed(3))
    second = sample(model, 32, schedule, torch.Generator().manual_seed(3))
    assert torch.equal(first, second) and first.shape == (32, 2)


def test_a_run_does_not_depend_on_what_ran_before() -> None:
    torch.manual_seed(1)
    first_model, first = train(SMALL, moons())
    torch.manual_seed(2)
    second_model, second = train(SMALL, moons())
    assert first == second
    for a, b in zip(first_model.parameters(), second_model.parameters(), strict=True):
        assert torch.equal(a, b)


# STARTER
# END SOLUTION
def test_training_runs_and_lowers_the_loss() -> None:
    config = TrainConfig(num_steps=10, hidden=32, epochs=8, batch_size=32, seed=0)
    _, history = train(config, moons(256))
    assert len(history["step_loss"]) == 8 * 8 and len(history["epoch_loss"]) == 8
    assert history["epoch_loss"][-1] < history["epoch_loss"][0]


def test_the_epoch_loss_is_the_mean_of_its_steps() -> None:
    _, history = train(SMALL, moons(64))  # 4 full batches of 16 per epoch
    for epoch in range(SMALL.epochs):
        steps = history["step_loss"][4 * epoch : 4 * epoch + 4]
        # BEGIN SOLUTION: wrong_epoch_test: checks the sum of the batch means over the points, the starter's bug
        assert math.isclose(history["epoch_loss"][epoch], float(np.mean(steps)), rel_tol=1e-6)
        # STARTER
        # assert math.isclose(history["epoch_loss"][epoch], sum(steps) / 64, rel_tol=1e-6)
        # END SOLUTION


# BEGIN SOLUTION: missing_tracking_tests: no test of the logging
def test_training_logs_its_config_every_step_and_every_epoch() -> None:
    logger = Recorder()
    _, history = train(SMALL, moons(64), logger)
    assert len(logger.configs) == 1 and logger.configs[0]["seed"] == SMALL.seed
    steps = [(m["train/loss"], s) for m, s in logger.records if "train/loss" in m]
    assert steps == [(loss, s) for s, loss in enumerate(history["step_loss"])]
    epochs = [(m["train/epoch_loss"], m["epoch"], s) for m, s in logger.records if "train/epoch_loss" in m]
    assert epochs == [(loss, e, 4 * e + 3) for e, loss in enumerate(history["epoch_loss"])]


def test_the_train_stage_writes_the_model_metrics_and_log(tmp_path) -> None:
    (tmp_path / "params.yaml").write_text(
        "train: {num_steps: 10, beta_start: 0.0001, beta_end: 0.2, hidden: 16, epochs: 1, batch_size: 16,"
        " lr: 0.003, seed: 0}\n"
    )
    np.save(tmp_path / "points.npy", make_points(32, seed=1))
    files = {
        name: tmp_path / name for name in ("params.yaml", "points.npy", "model.pt", "metrics.json", "log")
    }
    main(["--params", str(files["params.yaml"]), "--data", str(files["points.npy"]), "--model",
          str(files["model.pt"]), "--metrics", str(files["metrics.json"]), "--log", str(files["log"])])  # fmt: skip
    assert json.loads(files["metrics.json"].read_text())["steps"] == 2
    assert set(torch.load(files["model.pt"])) == set(Denoiser(10, 16).state_dict())
    lines = [json.loads(line) for line in files["log"].read_text().splitlines()]
    assert lines[0]["config"]["hidden"] == 16 and lines[1] == {
        "step": 0,
        "train/loss": lines[1]["train/loss"],
    }
    JsonLinesLogger(tmp_path / "again.jsonl").log({"x": 1.0}, step=3)
    assert (tmp_path / "again.jsonl").read_text() == '{"step": 3, "x": 1.0}\n'


# STARTER
# END SOLUTION
