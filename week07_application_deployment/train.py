"""Train the week's image classifier on generated gratings and export it with torch.export.

    python -m week07_application_deployment.train --out build/week07/classifier.pt2
    python -m week07_application_deployment.train --out build/week07/wide.pt2 --width 2048 --depth 3

The model is a small conv stem and an MLP head of `depth` residual blocks of `width` units. The head's width
sets how expensive a forward pass is: at width 2048 a batch-1 pass reads ~67 MB of weights to classify one
image, which is what makes batching pay on a CPU (see the README). It trains on CPU in seconds (tiny) to
about half a minute (wide), and reports its accuracy on held-out images before it exports.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from common.data import SyntheticImages
from week07_application_deployment.classifier import META_FILE
from week07_application_deployment.images import PIXEL_SCALE, class_names, to_pixels

__all__ = ["GratingClassifier", "TrainConfig", "export", "main", "train"]

HELD_OUT_SEED = 10_000  # the seed of images the model never trains on (tests and the benchmark use it too)


@dataclass(frozen=True)
class TrainConfig:
    """What to train: sizes, steps, seed."""

    num_classes: int = 4
    image_size: int = 32
    channels: int = 16  # conv stem: channels, then 2 * channels
    width: int = 128  # MLP head width: the knob for how costly one forward pass is
    depth: int = 1  # residual blocks in the head
    steps: int = 60
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    max_batch: int = 1024  # the largest batch the exported program accepts

    def __post_init__(self) -> None:
        if self.image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 (two 2x poolings), got {self.image_size}")
        if min(self.num_classes - 1, self.channels, self.width, self.steps, self.batch_size) < 1:
            raise ValueError(f"need num_classes >= 2 and positive sizes and steps, got {self}")


class GratingClassifier(nn.Module):
    """uint8 RGB images (B, 3, S, S) -> logits (B, classes); normalisation is part of the model."""

    def __init__(self, config: TrainConfig) -> None:
        super().__init__()
        c, s = config.channels, config.image_size
        self.stem = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, c, S/2, S/2)
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 2c, S/4, S/4)
            nn.Flatten(),  # (B, 2c * S²/16)
            nn.Linear(2 * c * (s // 4) ** 2, config.width),
        )  # fmt: skip
        self.blocks = nn.ModuleList(nn.Linear(config.width, config.width) for _ in range(config.depth))
        # Each block starts as the identity: deep heads train as fast as shallow ones.
        for block in self.blocks:
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)
        self.out = nn.Linear(config.width, config.num_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.float() - 128) / PIXEL_SCALE  # (B, 3, S, S), about unit variance
        h = self.stem(x)  # (B, width)
        for block in self.blocks:
            h = h + block(torch.relu(h))  # pre-activation residual block
        return self.out(torch.relu(h))  # (B, classes)


class _WithSoftmax(nn.Module):
    """What is exported: the classifier followed by softmax, so the program answers with probabilities."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(pixels), dim=-1)


def _pixels_and_labels(n: int, config: TrainConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = SyntheticImages(n, size=config.image_size, num_classes=config.num_classes, seed=seed)
    images, labels = zip(*(data[i] for i in range(n)), strict=True)
    return to_pixels(torch.stack(images)), torch.stack(labels)


def train(config: TrainConfig, *, log: bool = False) -> tuple[nn.Module, dict[str, float]]:
    """Train a GratingClassifier; return it (in eval mode) and its held-out accuracy and training time."""
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    pixels, labels = _pixels_and_labels(config.steps * config.batch_size, config, config.seed)
    model = GratingClassifier(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps)
    for step in range(config.steps):
        batch = slice(step * config.batch_size, (step + 1) * config.batch_size)
        loss = nn.functional.cross_entropy(model(pixels[batch]), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log and (step % 50 == 0 or step == config.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    model.eval()
    test_pixels, test_labels = _pixels_and_labels(512, config, HELD_OUT_SEED)
    with torch.inference_mode():
        accuracy = (model(test_pixels).argmax(-1) == test_labels).float().mean().item()
    return model, {"held_out_accuracy": accuracy, "train_s": time.perf_counter() - start}


def export(model: nn.Module, config: TrainConfig, out: Path, stats: dict[str, float]) -> Path:
    """torch.export the model (+ softmax) with a dynamic batch dimension; save it with its contract."""
    example = torch.zeros(2, 3, config.image_size, config.image_size, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=config.max_batch)
    program = torch.export.export(
        _WithSoftmax(model).eval(), (example,), dynamic_shapes={"pixels": {0: batch}}
    )
    meta = {
        "classes": class_names(config.num_classes),
        "image_size": config.image_size,
        "input": "uint8 (batch, 3, size, size) RGB",
        "output": "probabilities (batch, classes)",
        "batch": {"min": 1, "max": config.max_batch},
        "train": {**asdict(config), **stats},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, out, extra_files={META_FILE: json.dumps(meta)})
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: train, report held-out accuracy, export to --out."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m week07_application_deployment.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="the exported model file (.pt2)")
    for name in ("width", "depth", "channels", "steps", "batch_size", "num_classes", "image_size", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fields = {k: v for k, v in vars(args).items() if k not in ("out", "threads")}
    try:
        config = TrainConfig(**fields)
    except ValueError as error:
        parser.error(str(error))
    model, stats = train(config, log=True)
    path = export(model, config, Path(args.out), stats)
    size_mb = path.stat().st_size / 2**20
    print(
        f"held-out accuracy {stats['held_out_accuracy']:.3f}, trained in {stats['train_s']:.1f} s; "
        f"exported to {path} ({size_mb:.1f} MiB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
