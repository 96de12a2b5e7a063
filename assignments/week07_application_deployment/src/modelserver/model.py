"""The served model and its input, given by the course: the assignment is the service around them.

The classifier tells the orientation of week 7's gratings (`common.data.SyntheticImages`, 8-bit RGB, class c
at angle c * 180° / classes) from the image's *structure tensor*: the mean of gx², gy² and gx·gy over its
pixel gradients, which says how the stripes run whatever their phase and frequency. A linear head on those
features, fitted in closed form (nearest class mean, no training loop), gives the class probabilities. It is
small on purpose: the model file loads in milliseconds, so a server starts in the time it takes to import
torch, and the grader can start many.

    classifier = load_classifier("model.pt")
    pixels = decode_image(png_bytes, size=classifier.image_size)        # ImageError if it is not an image
    [prediction] = classifier.predict([pixels])                          # one forward pass for a list
    prediction.label, prediction.probabilities                           # "angle-045", {"angle-000": ...}

`predict` takes a list so that one call runs one forward pass for a whole batch of requests.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

__all__ = [
    "Classifier",
    "GradientClassifier",
    "ImageError",
    "Prediction",
    "decode_image",
    "fit_classifier",
    "load_classifier",
    "save_classifier",
]

MAX_PIXELS = 1 << 20  # an image header declaring more is refused before decoding (a "decompression bomb")


class GradientClassifier(nn.Module):
    """uint8 RGB images (B, 3, S, S) -> class probabilities (B, classes), from structure-tensor features."""

    def __init__(self, centroids: torch.Tensor, temperature: float) -> None:
        super().__init__()
        self.register_buffer("centroids", centroids)  # (classes, 2): each class's mean feature
        self.temperature = temperature

    @staticmethod
    def features(pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 -> (B, 2): orientation as (gxx - gyy, 2 gxy) / (gxx + gyy)."""
        gray = pixels.float().mean(dim=1)  # (B, S, S)
        gx = gray[:, 1:, 1:] - gray[:, 1:, :-1]  # (B, S-1, S-1)
        gy = gray[:, 1:, 1:] - gray[:, :-1, 1:]
        xx, yy, xy = ((a * b).mean(dim=(1, 2)) for a, b in ((gx, gx), (gy, gy), (gx, gy)))  # (B,) each
        return torch.stack([xx - yy, 2 * xy], dim=1) / (xx + yy + 1e-6)[:, None]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        distances = torch.cdist(self.features(pixels), self.centroids)  # (B, classes)
        return torch.softmax(-distances / self.temperature, dim=1)


@dataclass(frozen=True)
class Prediction:
    """One image's answer: the most probable class and every class's probability."""

    label: str
    probabilities: dict[str, float]


class Classifier:
    """A GradientClassifier with its class names and input size; predict() is one forward pass."""

    def __init__(self, module: GradientClassifier, classes: list[str], image_size: int) -> None:
        if module.centroids.shape[0] != len(classes):
            raise ValueError(f"{len(classes)} class names for {module.centroids.shape[0]} classes")
        self.module, self.classes, self.image_size = module, list(classes), image_size

    def predict(self, images: list[torch.Tensor]) -> list[Prediction]:
        """uint8 (3, size, size) images -> one Prediction each, in order, from one forward pass."""
        with torch.inference_mode():
            rows = self.module(torch.stack(images)).tolist()  # (batch, classes)
        return [
            Prediction(
                label=self.classes[max(range(len(row)), key=row.__getitem__)],
                probabilities=dict(zip(self.classes, row, strict=True)),
            )
            for row in rows
        ]


def fit_classifier(
    pixels: torch.Tensor, labels: torch.Tensor, classes: list[str], temperature: float = 0.1
) -> Classifier:
    """Fit the head in closed form: each class's centroid is the mean feature of its images."""
    features = GradientClassifier.features(pixels)
    missing = [name for c, name in enumerate(classes) if not (labels == c).any()]
    if missing:
        raise ValueError(f"no training image of class {missing}: every class needs at least one")
    centroids = torch.stack([features[labels == c].mean(dim=0) for c in range(len(classes))])
    return Classifier(GradientClassifier(centroids, temperature), classes, int(pixels.shape[-1]))


def save_classifier(classifier: Classifier, path: str | Path) -> Path:
    """Write the classifier as plain tensors and strings (loadable with weights_only=True)."""
    path = Path(path)
    torch.save(
        {
            "centroids": classifier.module.centroids,
            "temperature": classifier.module.temperature,
            "classes": classifier.classes,
            "image_size": classifier.image_size,
        },
        path,
    )
    return path


def load_classifier(path: str | Path) -> Classifier:
    """Read a file written by save_classifier; weights_only=True, so loading it runs no code from the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    state = torch.load(path, weights_only=True)
    module = GradientClassifier(state["centroids"], float(state["temperature"]))
    return Classifier(module, list(state["classes"]), int(state["image_size"]))


class ImageError(ValueError):
    """The uploaded bytes are not an image this service can read."""


def decode_image(data: bytes, *, size: int) -> torch.Tensor:
    """Image file bytes (PNG, JPEG, ...) -> uint8 (3, size, size) RGB pixels; ImageError if unreadable or not
    size x size (the model was fitted at that size; resizing would change what it sees)."""
    try:
        image = Image.open(io.BytesIO(data))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageError(f"the {len(data):,} bytes sent are not an image PIL can read: {error}") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageError(f"the image is {width}x{height} pixels; at most {MAX_PIXELS:,} are decoded")
    try:
        image = image.convert("RGB")  # decodes now: truncated or corrupt data fails here
    except (OSError, ValueError) as error:
        raise ImageError(f"the image file is truncated or corrupt: {error}") from None
    if image.size != (size, size):
        raise ImageError(f"the image is {image.size[0]}x{image.size[1]}; this model takes {size}x{size}")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()  # (3, size, size) uint8
