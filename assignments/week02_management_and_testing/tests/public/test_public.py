"""Public tests: some symptoms of the starter's bugs, and the shape of the tracking and the pipeline.

They do not point at every bug: finding the others is the assignment. Each fails on the starter.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from ddpm2d.train import TrainConfig, make_schedule, q_sample, train

ASSIGNMENT = Path(__file__).resolve().parents[2]


def test_the_forward_process_preserves_unit_variance() -> None:
    # DDPM's forward process is variance preserving: unit-variance data stays at unit variance at every step.
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(50_000, 2, generator=generator), torch.randn(50_000, 2, generator=generator)
    schedule = make_schedule(50, 1e-4, 0.2)
    for step in (5, 25, 49):
        x_t = q_sample(x0, torch.full((50_000,), step), eps, schedule)
        assert abs(x_t.var().item() - 1.0) < 0.03, f"Var[x_t] = {x_t.var().item():.3f} at t = {step}"


def test_the_epoch_loss_lies_among_its_step_losses() -> None:
    config = TrainConfig(num_steps=10, hidden=16, epochs=3, batch_size=8, seed=0)
    _, history = train(config, torch.randn(40, 2, generator=torch.Generator().manual_seed(1)))
    for epoch, loss in enumerate(history["epoch_loss"]):
        steps = history["step_loss"][5 * epoch : 5 * epoch + 5]
        assert min(steps) <= loss <= max(steps), (
            f"epoch {epoch}: {loss:.4f} is outside {min(steps):.4f}..{max(steps):.4f}"
        )


class _Calls:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def log_config(self, config: dict) -> None:
        self.calls.append(("config", config))

    def log(self, metrics: dict, step: int) -> None:
        self.calls.append(("log", metrics, step))


def test_training_reports_to_the_logger() -> None:
    logger = _Calls()
    config = TrainConfig(num_steps=10, hidden=16, epochs=1, batch_size=8, seed=0)
    train(config, torch.randn(16, 2, generator=torch.Generator().manual_seed(2)), logger)
    kinds = [call[0] for call in logger.calls]
    assert kinds[:1] == ["config"], f"log_config first, then log: got {kinds}"
    assert any("train/loss" in call[1] for call in logger.calls if call[0] == "log"), (
        "no train/loss was logged"
    )


def test_the_pipeline_has_a_prepare_and_a_train_stage() -> None:
    pipeline = yaml.safe_load((ASSIGNMENT / "src" / "dvc.yaml").read_text()) or {}
    stages = pipeline.get("stages") or {}
    assert {"prepare", "train"} <= set(stages), f"dvc.yaml declares the stages {sorted(stages)}"
