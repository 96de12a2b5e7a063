"""Training: one batch overfits on every device, a seed fixes the run, and the three stages run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from classifier import evaluate, prepare, tracking, train
from classifier.model import ConvNet

# One parametrised test for every device: CUDA runs where there is a GPU and is skipped, saying why, elsewhere.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


@pytest.mark.parametrize("device", DEVICES)
def test_one_batch_is_learned_by_heart(device: str) -> None:
    """16 noise images with random labels: a model that can learn can memorise them. If the loss does not
    fall to near zero, something between the data and the optimizer is broken (labels shuffled apart from
    the images, a detached loss, a learning rate of 0)."""
    generator = train.seed_everything(0)
    images = torch.randn(16, 3, 8, 8, generator=generator)
    labels = torch.randint(0, 4, (16,), generator=generator)
    model = ConvNet(4, width=16, dropout=0.0).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = [
        train.train_epoch(
            model, optimizer, images, labels, batch_size=16, transform=lambda x: x, generator=generator
        )[0]
        for _ in range(40)
    ]
    assert losses[-1] < 0.05 < losses[0], f"loss went from {losses[0]:.3f} to {losses[-1]:.3f}"


def test_a_seed_fixes_the_whole_run(cfg) -> None:
    prepare.run(cfg)
    first = train.run(cfg)
    weights = torch.load(cfg.paths.model, weights_only=True)["model"]
    assert train.run(cfg) == first
    again = torch.load(cfg.paths.model, weights_only=True)["model"]
    assert all(torch.equal(weights[name], again[name]) for name in weights)


def test_the_stages_run_end_to_end_and_write_their_metrics(cfg) -> None:
    assert prepare.run(cfg) == {"train": 128, "test": 64}
    trained = train.run(cfg)
    scored = evaluate.run(cfg)
    metrics = Path(cfg.paths.metrics)
    assert json.loads((metrics / "train.json").read_text()) == trained
    assert json.loads((metrics / "eval.json").read_text()) == scored
    assert 0.0 <= scored["accuracy"] <= 1.0 and scored["loss"] > 0


def test_an_offline_run_is_a_folder_that_wandb_sync_takes(cfg, capsys) -> None:
    cfg.wandb.mode = "offline"
    run = tracking.start_run(cfg, job_type="test")
    run.log({"loss": 1.0, "samples": tracking.image_grid(torch.zeros(3, 3, 4, 4, dtype=torch.uint8))})
    folder = tracking.finish(run)
    assert folder is not None and list(Path(folder).glob("run-*.wandb"))
    assert f"wandb sync {folder}" in capsys.readouterr().out
