"""Shared fixtures: a tiny configuration whose every output goes to a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from classifier.config import load_config
from omegaconf import DictConfig

# Toy tensors gain nothing from several threads, and where other processes share the cores (pytest-xdist
# workers, a busy CI machine) each thread's spin-waiting can make a step ten times slower.
torch.set_num_threads(1)


@pytest.fixture
def cfg(tmp_path: Path) -> DictConfig:
    """The project's configuration at toy size: 128 training images of 8x8, one epoch, W&B disabled."""
    return load_config(
        [
            "data.num_train=128",
            "data.num_test=64",
            "data.size=8",
            "data.num_classes=4",
            "train.epochs=1",
            "train.batch_size=32",
            "wandb.mode=disabled",
            f"paths.data={tmp_path}/data",
            f"paths.model={tmp_path}/model.pt",
            f"paths.metrics={tmp_path}/metrics",
            f"wandb.dir={tmp_path}",
        ]
    )


@pytest.fixture
def images() -> torch.Tensor:
    """A seeded batch of 8 uint8 images, 3 x 6 x 5 (not square, so a transposed axis would show)."""
    return torch.randint(0, 256, (8, 3, 6, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
