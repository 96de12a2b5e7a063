"""Stage 3, evaluate: score the saved model on the test split; log predictions to W&B, write eval.json."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
import wandb
from omegaconf import DictConfig

from classifier import tracking
from classifier.data import load_split
from classifier.metrics import accuracy, confusion_matrix
from classifier.model import ConvNet
from classifier.transforms import normalize


def load_model(cfg: DictConfig) -> tuple[ConvNet, dict[str, torch.Tensor]]:
    """The trained model (in eval mode) and the checkpoint it came from (with the normalisation stats)."""
    checkpoint = torch.load(cfg.paths.model, weights_only=True, map_location=cfg.device)
    model = ConvNet(cfg.data.num_classes, width=cfg.model.width, dropout=cfg.model.dropout).to(cfg.device)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint


@torch.no_grad()
def predict(model: ConvNet, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Softmax probabilities (N, num_classes) of normalised images, on the CPU."""
    device = next(model.parameters()).device
    chunks = [
        model(images[i : i + batch_size].to(device)).softmax(dim=1).cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks)


def run(cfg: DictConfig) -> dict[str, float]:
    """Evaluate paths.model on the test split; write paths.metrics/eval.json and return its metrics."""
    model, checkpoint = load_model(cfg)
    split = load_split(Path(cfg.paths.data) / "test.pt")
    probs = predict(model, normalize(split["images"], checkpoint["mean"].cpu(), checkpoint["std"].cpu()))
    predictions, labels = probs.argmax(dim=1), split["labels"]
    loss = torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
    metrics = {"accuracy": round(accuracy(predictions, labels), 4), "loss": round(loss, 4)}
    confusion = confusion_matrix(predictions, labels, cfg.data.num_classes)
    per_class = (confusion.diag() / confusion.sum(dim=1).clamp_min(1)).tolist()
    print(f"test accuracy {metrics['accuracy']:.3f}, loss {metrics['loss']:.3f} on {len(labels)} images")

    run = tracking.start_run(cfg, job_type="evaluate")
    run.summary.update({f"test/{key}": value for key, value in metrics.items()})
    table = wandb.Table(columns=["image", "label", "prediction", "confidence"])
    for i in range(min(cfg.wandb.num_samples, len(labels))):  # a few predictions to look at, right or wrong
        image = split["images"][i].permute(1, 2, 0).numpy()
        table.add_data(wandb.Image(image), int(labels[i]), int(predictions[i]), float(probs[i].max()))
    run.log({"test/predictions": table, "test/per_class_accuracy": wandb.Histogram(per_class)})
    tracking.save_metrics(cfg, "eval", metrics)
    tracking.finish(run)
    return metrics


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
