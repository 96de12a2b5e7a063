"""Stage 2, train: fit the ConvNet on the train split, log to W&B, save the model and training metrics."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from classifier import tracking
from classifier.data import load_split
from classifier.model import ConvNet
from classifier.transforms import augment, channel_stats, normalize


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (weights, dropout); returns a generator for the data order and augmentation."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def train_epoch(
    model: ConvNet,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int,
    transform: Callable[[torch.Tensor], torch.Tensor],
    generator: torch.Generator,
    on_step: Callable[[float], None] = lambda loss: None,
) -> tuple[float, float]:
    """One pass over (images, labels) in a random order; returns the mean loss and the accuracy on the way."""
    model.train()
    device = next(model.parameters()).device
    order = torch.randperm(len(labels), generator=generator)
    total_loss, correct = 0.0, 0
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        x, y = transform(images[index]).to(device), labels[index].to(device)
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()  # note: a host-device sync on a GPU, once per step
        total_loss += value * len(index)
        correct += int((logits.argmax(dim=1) == y).sum())
        on_step(value)
    return total_loss / len(labels), correct / len(labels)


def run(cfg: DictConfig) -> dict[str, float]:
    """Train, save paths.model and paths.metrics/train.json; returns the final epoch's metrics."""
    generator = seed_everything(cfg.seed)
    split = load_split(Path(cfg.paths.data) / "train.pt")
    mean, std = channel_stats(split["images"])
    images, labels = normalize(split["images"], mean, std), split["labels"]
    model = ConvNet(cfg.data.num_classes, width=cfg.model.width, dropout=cfg.model.dropout).to(cfg.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    def transform(batch: torch.Tensor) -> torch.Tensor:
        return augment(batch, hflip=cfg.data.hflip, crop_padding=cfg.train.crop_padding, generator=generator)

    run = tracking.start_run(cfg, job_type="train")
    # The first images as the model sees them, augmented (by a generator of their own, so that logging
    # them does not change the training run's randomness).
    shown = augment(
        split["images"][: cfg.wandb.num_samples],
        hflip=cfg.data.hflip,
        crop_padding=cfg.train.crop_padding,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    run.log({"samples/train": tracking.image_grid(shown)})
    started = time.perf_counter()
    for epoch in range(1, cfg.train.epochs + 1):
        loss, acc = train_epoch(
            model,
            optimizer,
            images,
            labels,
            batch_size=cfg.train.batch_size,
            transform=transform,
            generator=generator,
            on_step=lambda loss: run.log({"train/step_loss": loss}),
        )
        run.log({"epoch": epoch, "train/loss": loss, "train/accuracy": acc})
        print(f"epoch {epoch}: loss {loss:.3f}, accuracy {acc:.3f}")
    metrics = {"loss": round(loss, 4), "accuracy": round(acc, 4), "epochs": cfg.train.epochs}
    run.summary["train/seconds"] = time.perf_counter() - started

    Path(cfg.paths.model).parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {"model": model.state_dict(), "mean": mean, "std": std}
    torch.save(checkpoint, cfg.paths.model)
    tracking.save_metrics(cfg, "train", metrics)
    tracking.finish(run)
    return metrics


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
