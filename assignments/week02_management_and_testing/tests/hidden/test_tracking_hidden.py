"""Task tracking: `train` logs its config once, every step's loss and every epoch's loss, to the logger given.

The logger is the grader's (`scenarios/ddpm.py: RecordingLogger`): it lives in the worker and comes back as a
list of calls, which these tests compare with the run's own history.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from scenarios import ddpm as scenario

from common.grading.client import Submission

CONFIG = dict(
    num_steps=10, beta_start=1e-4, beta_end=0.2, hidden=16, epochs=3, batch_size=20, lr=3e-3, seed=4
)
N = 50  # batches of 20, 20, 10: three steps per epoch


@pytest.fixture
def run(submission: Submission) -> scenario.LoggedRun:
    points = torch.randn(N, 2, generator=torch.Generator().manual_seed(9))
    return submission.run(scenario.train_logged, CONFIG, points, returns=scenario.LoggedRun)


def _close(a: Any, b: float) -> bool:
    return type(a) in (int, float) and math.isclose(a, b, rel_tol=1e-6)


def test_the_config_is_logged_once_before_any_metric(run: scenario.LoggedRun) -> None:
    calls = run[2]
    configs = [i for i, (kind, _, _) in enumerate(calls) if kind == "config"]
    assert len(configs) == 1, f"log_config was called {len(configs)} times; expected once"
    assert configs[0] == 0, "log_config must come before the first log call"
    logged = calls[0][1]
    assert logged == CONFIG, f"log_config got {logged}; expected every field of the config: {CONFIG}"


def test_every_step_loss_is_logged_at_its_step(run: scenario.LoggedRun) -> None:
    history, _, calls = run
    steps = [
        (metrics["train/loss"], step)
        for kind, metrics, step in calls
        if kind == "log" and "train/loss" in metrics
    ]
    assert len(steps) == len(history) == 9, (
        f"{len(steps)} 'train/loss' logs for {len(history)} steps (expected 9)"
    )
    for s, ((value, step), loss) in enumerate(zip(steps, history, strict=True)):
        assert step == s and _close(value, loss), (
            f"step {s}: logged {value!r} at step {step!r}, loss was {loss}"
        )


def test_every_epoch_loss_is_logged_at_the_epochs_last_step(run: scenario.LoggedRun) -> None:
    _, history, calls = run
    epochs = [
        (metrics, step) for kind, metrics, step in calls if kind == "log" and "train/epoch_loss" in metrics
    ]
    assert len(epochs) == len(history) == 3, f"{len(epochs)} 'train/epoch_loss' logs for 3 epochs"
    for e, ((metrics, step), loss) in enumerate(zip(epochs, history, strict=True)):
        assert (
            _close(metrics["train/epoch_loss"], loss) and metrics.get("epoch") == e and step == 3 * e + 2
        ), (
            f"epoch {e}: logged {metrics} at step {step!r}; expected train/epoch_loss={loss}, epoch={e}, "
            f"step={3 * e + 2}"
        )
